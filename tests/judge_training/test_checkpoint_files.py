"""Resuming from a checkpoint folder with a planted pickle: one line naming the file, and the pickle never runs."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from misguard.core.errors import MisguardError
from misguard.judge_training.vlm import CHECKPOINTS, TrainConfig, train_judge
from tests.judge_training.test_trainer import make_examples


class Payload:
    """Unpickling this runs a shell command: what a tampered checkpoint file would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def first_epoch(tiny_model, demo_dir, tmp_path_factory):
    """A LoRA run of one epoch (one step): its judge folder holds out/checkpoints/checkpoint-1 to resume from."""
    out = tmp_path_factory.mktemp("resume") / "judge"
    config = TrainConfig(base=tiny_model("qwen2_vl"), out=out, epochs=1, batch_size=4, lora_dropout=0.0)
    train_judge(config, make_examples(demo_dir, "easy", slice(0, 2), 0)[:4], [], progress=False)
    assert (out / CHECKPOINTS / "checkpoint-1").is_dir()
    return config


def resume_with(first_epoch, tmp_path, planted: str):
    """Copy the run, plant `planted` in its checkpoint, resume for a second epoch; returns (config, marker)."""
    out = tmp_path / "judge"
    shutil.copytree(first_epoch.out, out)
    marker = tmp_path / "pickle-ran"
    torch.save({"state": Payload(marker)}, out / CHECKPOINTS / "checkpoint-1" / planted)
    config = TrainConfig(**{**first_epoch.__dict__, "out": out, "epochs": 2})
    return config, marker


@pytest.mark.parametrize("planted", ["rng_state.pth", "optimizer.pt"])
def test_a_planted_pickle_stops_the_resume_naming_the_file(first_epoch, demo_dir, tmp_path, planted):
    config, marker = resume_with(first_epoch, tmp_path, planted)
    with pytest.raises(MisguardError, match="a pickle that holds more than tensors") as caught:
        train_judge(config, make_examples(demo_dir, "easy", slice(0, 2), 0)[:4], [], progress=False)
    message = str(caught.value)
    assert message.startswith(str(config.out / CHECKPOINTS / "checkpoint-1" / planted)) and "\n" not in message
    assert not marker.exists()


def test_a_pickle_the_trainer_never_reads_is_never_run(first_epoch, demo_dir, tmp_path):
    config, marker = resume_with(first_epoch, tmp_path, "training_args.bin")  # written, never read back
    result = train_judge(config, make_examples(demo_dir, "easy", slice(0, 2), 0)[:4], [], progress=False)
    assert result.resumed_from.endswith("checkpoint-1") and result.global_step == 2
    assert not marker.exists()
