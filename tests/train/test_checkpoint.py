from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sparse_train.train import checkpoint as ckpt
from sparse_train.train import sharded


def _model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def _save(dir_, step, model, opt, **kw):
    weights, optim_state = sharded.model_state(model), sharded.optimizer_state(model, opt)
    keep = kw.pop("keep", 10)
    return ckpt.save_checkpoint(dir_, step, weights, optim_state, {"step": step}, "train: {}\n", keep=keep, **kw)


def test_roundtrip_restores_weights_optimizer_and_state(tmp_path):
    model, opt = _model_and_opt(0)
    path = _save(tmp_path, 5, model, opt)
    assert path.name == "step_00000005" and (path / "manifest.json").is_file()
    other, other_opt = _model_and_opt(1)
    state = ckpt.load_checkpoint(path, other, other_opt)
    assert state == {"step": 5}
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])


def test_crash_before_publish_leaves_previous_checkpoint_and_is_ignored(tmp_path):
    model, opt = _model_and_opt()
    _save(tmp_path, 1, model, opt)

    def crash(_tmp):
        raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, model, opt, before_rename=crash)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [1]
    assert ckpt.latest_valid_checkpoint(tmp_path, warn=print).name == "step_00000001"
    _save(tmp_path, 3, model, opt)  # the next save cleans the leftover
    assert not list(tmp_path.glob(".step_*"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete-manifest", "delete-file", "bad-manifest"])
def test_damaged_newest_checkpoint_is_reported_and_skipped(tmp_path, damage):
    model, opt = _model_and_opt()
    _save(tmp_path, 1, model, opt)
    newest = _save(tmp_path, 2, model, opt)
    weights = next((newest / "model").glob("*.distcp"))  # one rank's shard file
    if damage == "flip":
        raw = bytearray(weights.read_bytes())
        raw[-3] ^= 0xFF
        weights.write_bytes(bytes(raw))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif damage == "delete-manifest":
        (newest / "manifest.json").unlink()
    elif damage == "delete-file":
        next((newest / "optim").glob("*.distcp")).unlink()
    else:
        (newest / "manifest.json").write_text("{")
    warnings = []
    found = ckpt.latest_valid_checkpoint(tmp_path, warn=warnings.append)
    assert found.name == "step_00000001"
    assert len(warnings) == 1 and "step_00000002" in warnings[0]
    with pytest.raises(ckpt.CheckpointError, match="step_00000002"):
        ckpt.load_checkpoint(newest, model, opt)


def test_all_broken_is_an_error_not_a_fresh_start(tmp_path):
    model, opt = _model_and_opt()
    path = _save(tmp_path, 1, model, opt)
    (path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint verifies"):
        ckpt.latest_valid_checkpoint(tmp_path, warn=lambda m: None)
    assert ckpt.latest_valid_checkpoint(tmp_path / "empty", warn=lambda m: None) is None


def test_keep_last_n(tmp_path):
    model, opt = _model_and_opt()
    for step in range(1, 6):
        _save(tmp_path, step, model, opt, keep=2)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [5, 4]


def test_refuses_to_save_non_finite_weights(tmp_path):
    model, opt = _model_and_opt()
    _save(tmp_path, 1, model, opt)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match="not finite"):
        _save(tmp_path, 2, model, opt)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [1]


def test_manifest_lists_sizes_and_checksums(tmp_path):
    model, opt = _model_and_opt()
    path = _save(tmp_path, 7, model, opt)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7
    assert {"model/.metadata", "optim/.metadata", "state.pt", "config.yaml", "layout.json"} <= set(manifest["files"])
    assert any(name.startswith("model/") and name.endswith(".distcp") for name in manifest["files"])
    assert all(len(m["sha256"]) == 64 for m in manifest["files"].values())


def _write_format1(dir_, step, model, opt):
    """A checkpoint as the single-process writer before sharded checkpoints laid it out."""
    from safetensors.torch import save_file

    path = dir_ / ckpt.step_dir_name(step)
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    torch.save(ckpt.optimizer_state(model, opt), path / "optimizer.pt")
    torch.save({"step": step}, path / "state.pt")
    (path / "config.yaml").write_text("train: {}\n")
    files = {f.name: {"bytes": f.stat().st_size, "sha256": ckpt._sha256(f)} for f in sorted(path.iterdir())}
    (path / "manifest.json").write_text(json.dumps({"format": 1, "step": step, "files": files}))
    return path


def test_format_1_checkpoints_still_load(tmp_path):
    model, opt = _model_and_opt(0)
    path = _write_format1(tmp_path, 4, model, opt)
    other, other_opt = _model_and_opt(1)
    assert ckpt.load_checkpoint(path, other, other_opt) == {"step": 4}
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])
    assert set(ckpt.read_weights(path)) == set(model.state_dict())


def test_a_checkpoint_of_another_model_shape_names_the_tensors(tmp_path):
    model, opt = _model_and_opt(0)
    path = _save(tmp_path, 1, model, opt)
    wider = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    expected = r"3 tensors differ in shape: 0.weight is \(4, 4\) in the checkpoint, \(6, 4\) in the model"
    with pytest.raises(ckpt.CheckpointError, match=expected):
        ckpt.load_checkpoint(path, wider, torch.optim.AdamW(wider.parameters()))
    deeper = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    with pytest.raises(ckpt.CheckpointError, match=r"missing \['2.bias', '2.weight'\]"):
        ckpt.load_checkpoint(path, deeper)
