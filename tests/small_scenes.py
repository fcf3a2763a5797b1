"""What the baseline, search and retraining tests share: a tiny conv backbone on 16x16 synthetic scenes, a
Trainer for a few CPU steps, exact output comparison, and the docs' scripts as modules. Each test file keeps its
own data sizes."""

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from lightning.pytorch import Trainer

from datamodules.synthetic import SyntheticScenesDataModule
from dymu.backbones import ConvEncoderDecoder
from lightning_modules.anchor import AnchorPretraining

BACKBONE = dict(channels=(4, 6), strides=(1, 2), decoder_width=8, low_level_block=0)
INPUT = (3, 16, 16)


def scenes(tasks, **kwargs):
    """The synthetic scenes at 16x16: 16 / 8 / 4 samples, batches of 4, unless ``kwargs`` says otherwise."""
    args = dict(tasks=tasks, num_train=16, num_val=8, num_test=4, image_size=16, batch_size=4)
    return SyntheticScenesDataModule(**{**args, **kwargs})


def backbone():
    return ConvEncoderDecoder(**BACKBONE)


def fit(module, root, steps, dm, callbacks=(), **kwargs):
    """``steps`` training steps on CPU, no logger or checkpoints, one validation batch unless ``kwargs`` says."""
    trainer = Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=root,
                      callbacks=list(callbacks), **{"limit_val_batches": 1, **kwargs})
    trainer.fit(module, dm)
    return trainer


def assert_outputs_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def anchor_checkpoint(root, dm) -> str:
    """A DYMU anchor of independent streams trained two steps on ``dm`` (seed 0), saved as ``root/anchor.ckpt``."""
    torch.manual_seed(0)
    tasks = [t.to_config() for t in dm.tasks]
    module = AnchorPretraining(backbone(), task_configs=tasks, input_shape=INPUT, stream_init="independent")
    fit(module, root, 2, dm, limit_val_batches=0).save_checkpoint(root / "anchor.ckpt")
    return str(root / "anchor.ckpt")


def doc_script(name: str) -> ModuleType:
    """``docs/scripts/<name>.py`` loaded as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "docs" / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
