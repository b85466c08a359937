"""Validation and held-out evaluation go through the chunked loss: the largest tensor they allocate is a
chunk's logits, not [tokens, vocab]."""

from __future__ import annotations

import torch

from moecpt.data.tokenizer import load_tokenizer
from moecpt.eval.heldout import heldout_bits_per_byte
from moecpt.train.trainer import Trainer

from ..kernels.test_cross_entropy import _LargestTensor

CHUNK = 64


def _bound(model) -> int:
    V, H = model.config.vocab_size, model.config.hidden_size
    return max(CHUNK * V, V * H)  # a chunk's logits, or a weight as large as the embedding


def test_validation_never_holds_the_logits_of_a_batch(tiny_config):
    trainer = Trainer.from_config(tiny_config("--data.seq_len=256", "--training.micro_batch=4",
                                              "--training.global_batch=4", "--logging.val_batches=1"))
    trainer.model.use_kernels(False, loss_chunk_tokens=CHUNK)
    tokens = 4 * 256
    assert tokens * trainer.model.config.vocab_size > 4 * _bound(trainer.model)  # the check would see them
    with _LargestTensor() as mode:
        val = trainer.validator(trainer.model)
    assert val and all(torch.isfinite(torch.tensor(v)) for v in val.values())
    assert mode.largest <= _bound(trainer.model)


def test_heldout_bits_per_byte_never_holds_the_logits_of_a_batch(tiny_config):
    model = Trainer.from_config(tiny_config()).model.eval()
    model.use_kernels(False, loss_chunk_tokens=CHUNK)
    tokenizer = load_tokenizer(None)
    texts = ["吾輩は猫である。名前はまだ無い。" * 40, "It was the best of times, it was the worst of times. " * 30]
    with _LargestTensor() as mode:
        out = heldout_bits_per_byte(model, tokenizer, texts, max_length=512, batch_size=2)
    assert out["tokens"] * model.config.vocab_size > 4 * _bound(model)
    assert mode.largest <= _bound(model)
    assert 0 < out["bits_per_byte"] < 100
