"""Validation loss per corpus on its held-out documents, in nats per token and bits per UTF-8 byte, through
the model's own loss (no [tokens, vocab] logits)."""

from __future__ import annotations

import numpy as np
import torch

from moecpt.data.loader import validation_batches
from moecpt.data.mixture import MixtureDataset
from moecpt.data.tokenizer import Tokenizer
from moecpt.model import CausalLM
from moecpt.model.loss import bits_per_byte
from moecpt.parallel import dist as pdist
from moecpt.train.setup import Runtime


class FirstWindows:
    """The first `n` windows of a validation set (a view with its `__len__` and `__getitem__`)."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.dataset[i]


def model_inputs(batch: dict[str, torch.Tensor], intra_doc: bool) -> dict:
    """The model's keyword arguments for a packed batch: inputs, shifted targets and, with intra-document
    attention, positions that restart at each document."""
    kw = {"input_ids": batch["tokens"][:, :-1], "targets": batch["tokens"][:, 1:]}
    if intra_doc:
        kw |= {"position_ids": batch["position_ids"], "intra_doc_attention": True}
    return kw


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


class Validator:
    """The first `windows` validation windows of each corpus, split over the ranks: the same windows at
    any world size."""

    def __init__(self, dataset: MixtureDataset, tokenizer: Tokenizer, rt: Runtime, micro_batch: int, windows: int,
                 seq_len: int, intra_doc: bool):
        self.dataset, self.tokenizer, self.rt = dataset, tokenizer, rt
        self.micro_batch, self.windows, self.seq_len, self.intra_doc = micro_batch, windows, seq_len, intra_doc
        self._bytes: dict[tuple[int, int], int] = {}

    def window_bytes(self, corpus: int, index: int, tokens: np.ndarray) -> int:
        """UTF-8 bytes of the text of the tokens a window predicts (all but its first; EOS and the other special
        tokens count zero bytes), cached: the windows never change."""
        key = (corpus, index)
        if key not in self._bytes:
            self._bytes[key] = self.tokenizer.byte_length(tokens[1:].tolist())
        return self._bytes[key]

    @torch.no_grad()
    def __call__(self, model: CausalLM) -> dict[str, float]:
        model.eval()
        out: dict[str, float] = {}
        for c, corpus in enumerate(self.dataset.corpora):
            nats, tokens, n_bytes = self._corpus(model, c)
            if tokens > 0:
                out[f"val_loss/{corpus.name}"] = nats / tokens
                out[f"val_bpb/{corpus.name}"] = bits_per_byte(nats, n_bytes)
        model.train()
        return out

    def _corpus(self, model: CausalLM, c: int) -> tuple[float, float, float]:
        """Summed nats, tokens and bytes of corpus `c` over all ranks (one read-back)."""
        first = FirstWindows(self.dataset.validation_dataset(c), self.windows)
        batches = list(validation_batches(first, self.micro_batch, self.rt.rank, self.rt.world))
        # Sharded and expert-parallel forwards are collective: every rank runs as many as the busiest one,
        # a rank with fewer windows on a dummy batch whose result it ignores.
        passes = int(pdist.all_reduce(torch.tensor(len(batches), device=self.rt.device), op="max"))
        sums = torch.zeros(3, device=self.rt.device, dtype=torch.float64)
        for b in batches:
            with self.rt.compute():
                res = model(**model_inputs(to_device(b, self.rt.device), self.intra_doc))
            n_bytes = sum(self.window_bytes(c, int(i), row) for i, row in zip(b["index"], b["tokens"], strict=True))
            sums += torch.stack([res.token_loss.sum().double(), res.token_loss.new_tensor(res.token_loss.numel()).double(),
                                 res.token_loss.new_tensor(n_bytes).double()])
        for _ in range(len(batches), passes):
            with self.rt.compute():
                model(torch.zeros(1, self.seq_len, dtype=torch.long, device=self.rt.device))
        return tuple(pdist.all_reduce(sums).tolist())
