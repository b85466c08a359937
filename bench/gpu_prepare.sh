#!/usr/bin/env bash
# Gathers what bench/gpu_session.sh needs on a GPU machine that cannot reach ../shared or PyPI: the Mixtral
# tokenizer and the corpora scripts/check_bf16.py trains on, into .gpu/ (git-ignored; carried by the call).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/corpus
python - <<'PY'
import shutil
from moecpt.data.tokenizer import default_tokenizer_path
shutil.copy(default_tokenizer_path(), ".gpu/tokenizer.model")
PY
for f in ja/wikipedia_train.jsonl ja/aozora_neko.jsonl en/wikitext2_test.jsonl en/tinyshakespeare.jsonl \
         code/thealgorithms_python.jsonl math/gsm8k_train.jsonl; do
  mkdir -p ".gpu/corpus/$(dirname $f)" && cp "../shared/data/corpus/$f" ".gpu/corpus/$f"
done
du -sh .gpu
