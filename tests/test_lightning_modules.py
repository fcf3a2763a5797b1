"""Stage modules on their own: stream initialisation, assembling from single-task checkpoints, errors."""

import pytest
import torch
from lightning.pytorch import Trainer

from datamodules.synthetic import SyntheticScenesDataModule
from dymu.backbones import ConvEncoderDecoder
from lightning_modules.anchor import AnchorPretraining

BACKBONE = dict(channels=(4, 6), strides=(1, 2), decoder_width=8, low_level_block=0)


def data():
    return SyntheticScenesDataModule(tasks=["semseg", "depth"], num_train=8, num_val=4, num_test=4,
                                     image_size=16, batch_size=4)


def anchor_module(**kwargs):
    dm = data()
    return AnchorPretraining(ConvEncoderDecoder(**BACKBONE), task_configs=[t.to_config() for t in dm.tasks],
                             input_shape=dm.input_shape, **kwargs)


def streams_equal(module, a, b):
    sa, sb = module.model.anchor.streams[a].state_dict(), module.model.anchor.streams[b].state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_shared_and_independent_stream_init():
    torch.manual_seed(0)
    assert streams_equal(anchor_module(stream_init="shared"), 0, 1)
    assert not streams_equal(anchor_module(stream_init="independent"), 0, 1)
    with pytest.raises(ValueError, match="stream_init must be"):
        anchor_module(stream_init="copy")


def fit(module, tmp_path, steps):
    trainer = Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, data())
    return trainer


def test_shared_warmup_trains_one_stream_then_copies_it(tmp_path):
    torch.manual_seed(0)
    module = anchor_module(stream_init="independent", shared_warmup_steps=3)
    untouched = {k: v.clone() for k, v in module.model.anchor.streams[1].state_dict().items()}
    fit(module, tmp_path, steps=3)
    # during the warm-up only stream 0 (shared by both heads) trains
    assert all(torch.equal(untouched[k], v) for k, v in module.model.anchor.streams[1].state_dict().items())
    module.on_train_batch_start(None, 0)  # step 3: the copy happens before the first per-stream step
    assert streams_equal(module, 0, 1)


def test_pretrained_weights_load_into_every_stream(tmp_path):
    source = anchor_module(stream_init="independent")
    path = tmp_path / "stream.pt"
    torch.save(source.model.anchor.streams[1].state_dict(), path)
    module = anchor_module(stream_init="independent", pretrained=str(path))
    module.setup("fit")
    assert streams_equal(module, 0, 1)
    ref = source.model.anchor.streams[1].state_dict()
    assert all(torch.equal(ref[k], v) for k, v in module.model.anchor.streams[0].state_dict().items())
    torch.save({"wrong": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not fit this backbone"):
        anchor_module(pretrained=str(tmp_path / "bad.pt")).setup("fit")
    with pytest.raises(FileNotFoundError, match="missing.pt do not exist"):
        anchor_module(pretrained=str(tmp_path / "missing.pt")).setup("fit")


def test_assemble_from_single_task_checkpoints(tmp_path):
    torch.manual_seed(1)
    donor = anchor_module(stream_init="independent")
    trainer = fit(donor, tmp_path, steps=1)
    ckpt = tmp_path / "donor.ckpt"
    trainer.save_checkpoint(ckpt)
    module = anchor_module(stream_init="independent", single_task_checkpoints={"depth": str(ckpt)})
    module.setup("fit")
    got, want = module.model.anchor.streams[1].state_dict(), donor.model.anchor.streams[1].state_dict()
    assert all(torch.equal(want[k], v) for k, v in got.items())
    head_got, head_want = module.model.anchor.heads[1].state_dict(), donor.model.anchor.heads[1].state_dict()
    assert all(torch.equal(head_want[k], v) for k, v in head_got.items())
    assert not streams_equal(module, 0, 1)
    with pytest.raises(ValueError, match="names tasks \\['edges'\\]"):
        anchor_module(single_task_checkpoints={"edges": str(ckpt)})
