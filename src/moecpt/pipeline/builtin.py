"""The corpora of the embedded default recipe, made on the spot so that `moecpt run` needs no download.

- `ja`: Japanese prose generated from templates and word lists written for moecpt (towns, seasons, daily life),
  plus arithmetic word problems with worked answers in Japanese.
- `en`: English prose from the docstrings of the Python standard library installed with the interpreter, plus
  English arithmetic word problems.
- `code`: source files of that standard library.
- `math`: arithmetic problems with worked answers, half Japanese and half English.

Each corpus also gets a held-out file with documents the training files do not contain (another random
stream for the generated text, other modules for the docstrings). Everything is a pure function of the seed
and the interpreter's standard library, so two machines with the same Python produce the same files.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from pathlib import Path

# ---- Japanese -------------------------------------------------------------------------------------------
_TOWNS = ["港町", "山あいの村", "城下町", "川沿いの町", "古い宿場町", "海辺の集落", "高原の町", "島の村",
          "門前町", "田園の町", "雪国の町", "温泉町"]
_SEASONS = ["春", "夏", "秋", "冬", "梅雨", "初夏", "晩秋", "早春"]
_EVENTS = ["祭り", "市", "花火大会", "運動会", "収穫祭", "盆踊り", "雪まつり", "朝市", "灯籠流し", "展覧会"]
_FOODS = ["おにぎり", "味噌汁", "焼き魚", "そば", "うどん", "団子", "漬物", "煮物", "天ぷら", "すき焼き",
          "柿", "みかん", "栗ご飯", "豆腐"]
_PEOPLE = ["祖母", "祖父", "父", "母", "兄", "姉", "弟", "妹", "友人", "先生", "近所の人", "店の主人"]
_PLACES = ["駅", "図書館", "公園", "神社", "商店街", "学校", "港", "畑", "橋のたもと", "川原", "丘の上", "市場"]
_ACTIONS = ["散歩をした", "本を読んだ", "写真を撮った", "絵を描いた", "手紙を書いた", "魚を釣った",
            "野菜を育てた", "料理を作った", "星を眺めた", "歌を歌った", "掃除をした", "昔話を聞いた"]
_FEELINGS = ["懐かしい", "穏やかな", "にぎやかな", "静かな", "楽しい", "少し寂しい", "温かい", "不思議な"]
_WEATHER = ["晴れ", "曇り", "小雨", "雪", "強い風", "霧", "夕立", "快晴"]
_TIMES = ["朝早く", "昼過ぎ", "夕方", "夜", "明け方", "日曜日の午後", "休みの日", "学校の帰り"]
_THINGS = ["古い時計", "木の机", "青い傘", "小さな鈴", "赤い自転車", "竹のかご", "白い茶碗", "大きな地図"]

_JA_SENTENCES = [
    "{town}では、{season}になると{event}が開かれる。",
    "{time}、{person}と一緒に{place}へ行き、{action}。",
    "その日は{weather}で、{place}には{feeling}空気が流れていた。",
    "{person}が作る{food}は、いつ食べても{feeling}味がする。",
    "{place}の近くに、{thing}を大切にしている家がある。",
    "{season}の{town}は{feeling}雰囲気に包まれる。",
    "{time}に{place}で{action}ことを、今でもよく覚えている。",
    "{person}は{thing}を手に取り、{feeling}顔で笑った。",
    "天気予報によると、明日の{town}は{weather}になるそうだ。",
    "{event}の日には、{place}に{food}の店がたくさん並ぶ。",
]
_JA_OPENINGS = ["ある{season}の話である。", "これは{town}で暮らす家族の記録である。", "{town}の一日を書き留めておく。"]


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        town=rng.choice(_TOWNS), season=rng.choice(_SEASONS), event=rng.choice(_EVENTS), food=rng.choice(_FOODS),
        person=rng.choice(_PEOPLE), place=rng.choice(_PLACES), action=rng.choice(_ACTIONS),
        feeling=rng.choice(_FEELINGS), weather=rng.choice(_WEATHER), time=rng.choice(_TIMES),
        thing=rng.choice(_THINGS))


def japanese_essay(rng: random.Random) -> str:
    """A short paragraph of everyday Japanese prose."""
    lines = [_fill(rng.choice(_JA_OPENINGS), rng)]
    lines += [_fill(rng.choice(_JA_SENTENCES), rng) for _ in range(rng.randint(4, 9))]
    return "".join(lines)


# ---- arithmetic word problems with worked answers ----------------------------------------------------------
_ITEMS_JA = [("りんご", "個"), ("鉛筆", "本"), ("切手", "枚"), ("卵", "個"), ("花", "本"), ("ノート", "冊")]
_ITEMS_EN = [("apples", "apple"), ("pencils", "pencil"), ("stamps", "stamp"), ("eggs", "egg"),
             ("books", "book"), ("marbles", "marble")]
_NAMES_EN = ["Ken", "Mia", "Sara", "Tom", "Yuki", "Ana", "Leo", "Nora"]
_NAMES_JA = ["太郎", "花子", "健", "さくら", "翔太", "美咲", "大輔", "葵"]


def math_problem(rng: random.Random, lang: str) -> str:
    """A word problem and its step-by-step solution, ending with the answer (as GSM8K-style data does)."""
    kind = rng.choice(["add", "sub", "mul", "two_step"])
    a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 9)
    if lang == "ja":
        item, unit = rng.choice(_ITEMS_JA)
        name = rng.choice(_NAMES_JA)
        if kind == "add":
            q = f"{name}さんは{item}を{a}{unit}持っています。{b}{unit}もらいました。全部で何{unit}になりましたか。"
            s, ans = f"{a}+{b}={a + b}", a + b
        elif kind == "sub":
            a = a + b
            q = f"{name}さんは{item}を{a}{unit}持っています。{b}{unit}あげました。残りは何{unit}ですか。"
            s, ans = f"{a}-{b}={a - b}", a - b
        elif kind == "mul":
            q = f"1つの箱に{item}が{c}{unit}入っています。{b}箱では何{unit}ですか。"
            s, ans = f"{c}×{b}={b * c}", b * c
        else:
            q = (f"{name}さんは{item}を{a}{unit}持っています。{c}{unit}入りの袋を{b}袋買いました。"
                 f"全部で何{unit}ですか。")
            s, ans = f"袋の分は{c}×{b}={b * c}、合わせて{a}+{b * c}={a + b * c}", a + b * c
        return f"問題：{q}\n答え：{s}。答えは{ans}です。"
    plural, single = rng.choice(_ITEMS_EN)
    name = rng.choice(_NAMES_EN)
    if kind == "add":
        q = f"{name} has {a} {plural}. A friend gives {name} {b} more. How many {plural} does {name} have now?"
        s, ans = f"{a} + {b} = {a + b}", a + b
    elif kind == "sub":
        a = a + b
        q = f"{name} has {a} {plural} and gives away {b}. How many {plural} are left?"
        s, ans = f"{a} - {b} = {a - b}", a - b
    elif kind == "mul":
        q = f"A box holds {c} {plural}. How many {plural} are in {b} boxes?"
        s, ans = f"{c} x {b} = {b * c}", b * c
    else:
        q = f"{name} has {a} {plural} and buys {b} bags with {c} {plural} in each. How many {plural} in all?"
        s, ans = f"The bags hold {c} x {b} = {b * c}, so {a} + {b * c} = {a + b * c}", a + b * c
    return f"Question: {q}\nAnswer: {s}.\n#### {ans}"


# ---- the Python standard library ---------------------------------------------------------------------------
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The modules of the running interpreter's standard library (not its tests or third-party packages)."""
    root = stdlib_root()
    return sorted(p for p in root.rglob("*.py") if not _SKIP_PARTS & set(p.relative_to(root).parts))


def docstrings(path: Path) -> list[str]:
    """The module, class and function docstrings of a source file that read as prose (a few words at least)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef))]
    out = []
    for node in nodes:
        doc = ast.get_docstring(node)
        if doc and len(doc.split()) >= 8:
            out.append(doc.strip())
    return out


# ---- writing the corpora -----------------------------------------------------------------------------------
def _write(path: Path, texts: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "id": f"{path.stem}-{i}", "source": "moecpt builtin"}, ensure_ascii=False) + "\n")
    tmp.replace(path)


BUILTIN = ("ja", "en", "code", "math")


def builtin_paths(out_dir: str | Path) -> dict[str, Path]:
    """Where `write_builtin_corpora` puts each corpus and its held-out file (nothing is written)."""
    out = Path(out_dir)
    return {n: out / f"{n}.jsonl" for n in BUILTIN} | {f"{n}_heldout": out / f"{n}_heldout.jsonl" for n in BUILTIN}


def write_builtin_corpora(out_dir: str | Path, seed: int = 0, ja_docs: int = 4000, math_docs: int = 3000,
                          heldout_docs: int = 60) -> dict[str, Path]:
    """Write `{ja,en,code,math}.jsonl` and `{ja,en,code,math}_heldout.jsonl` into `out_dir` (skipped when present)."""
    paths = builtin_paths(out_dir)
    if all(p.is_file() for p in paths.values()):
        return paths
    Path(out_dir).mkdir(parents=True, exist_ok=True)

    def stream(label: str) -> random.Random:
        return random.Random(f"{seed}-{label}")

    def write_pair(name: str, train: list[str], held: list[str]) -> None:
        """Held-out documents that also occur in training (short generated problems, docstrings shared by
        several modules) are dropped, so held-out loss measures unseen text."""
        seen = set(train)
        _write(paths[name], train)
        _write(paths[f"{name}_heldout"], [t for t in held if t not in seen])

    train_rng, held_rng = stream("ja"), stream("ja-heldout")
    write_pair("ja", [japanese_essay(train_rng) + "\n" + math_problem(train_rng, "ja") if i % 5 == 0
                      else japanese_essay(train_rng) for i in range(ja_docs)],
               [japanese_essay(held_rng) for _ in range(heldout_docs)])

    files = stdlib_files()
    held_files = files[::10]  # every tenth module is held out, for both the English and the code corpus
    train_files = [f for f in files if f not in held_files]
    en_rng = stream("en")
    en_train = [d for f in train_files for d in docstrings(f)]
    en_train += [math_problem(en_rng, "en") for _ in range(len(en_train) // 10)]
    write_pair("en", en_train, [d for f in held_files for d in docstrings(f)][: heldout_docs * 4])

    def source(f: Path) -> str:
        return f"# {f.relative_to(stdlib_root())}\n" + f.read_text(encoding="utf-8", errors="replace")

    write_pair("code", [source(f) for f in train_files], [source(f) for f in held_files][:heldout_docs])

    m_rng, mh_rng = stream("math"), stream("math-heldout")
    write_pair("math", [math_problem(m_rng, "ja" if i % 2 else "en") for i in range(math_docs)],
               [math_problem(mh_rng, "ja" if i % 2 else "en") for i in range(heldout_docs)])
    return paths
