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


def test_crash_before_publish_leaves_previous_checkpoint_and_is_ignored(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    _save(tmp_path, 1, model, opt)

    def crash(tmp, _checkpoints_dir, _step):
        assert (tmp / "manifest.json").is_file()  # everything written, only the publication left
        raise KeyboardInterrupt("killed mid-save")

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "_publish_step", crash)
        with pytest.raises(KeyboardInterrupt):
            _save(tmp_path, 2, model, opt)
    assert list(tmp_path.glob(".step_00000002.tmp"))  # the unpublished copy is left behind...
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


class _Leaves(nn.Module):
    """Parameters named as sparse layers name theirs (format 3: no shape suffixes)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.w_gate_up = nn.Parameter(torch.randn(2, 3, 2, 4))
        self.w_down = nn.Parameter(torch.randn(2, 4, 3))
        self.node_weight = nn.Parameter(torch.randn(3, 3))
        self.node_bias = nn.Parameter(torch.randn(3))
        self.head = nn.Linear(3, 2)  # a name no format changed


def _leaves_and_opt(seed: int):
    model = nn.Sequential(_Leaves(seed))
    opt = torch.optim.AdamW(model.parameters())
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    return model, opt


OLD_NAMES = {new: old for old, new in sharded.RENAMED.items()}


def _as_format_2(sd: dict) -> dict:
    """A state dict as format 2 stored it: names with shape suffixes (w_down -> w_down_EFD)."""
    return {".".join(OLD_NAMES.get(part, part) for part in key.split(".")): v for key, v in sd.items()}


def _write_format2(dir_, step, model, opt):
    """A checkpoint as format 2 wrote it: this format's writer given the old names, manifest format 2."""
    weights = _as_format_2(sharded.model_state(model))
    optim_state = _as_format_2(sharded.optimizer_state(model, opt))
    assert "0.w_down_EFD" in weights and "state.0.node_bias_N.exp_avg" in optim_state
    path = ckpt.save_checkpoint(dir_, step, weights, optim_state, {"step": step}, "train: {}\n", keep=10)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": 2}))
    return path


def test_format_2_checkpoints_with_shape_suffixed_names_still_load(tmp_path):
    model, opt = _leaves_and_opt(0)
    path = _write_format2(tmp_path, 4, model, opt)
    assert ckpt.checkpoint_format(path) == 2
    other, other_opt = _leaves_and_opt(1)
    assert ckpt.load_checkpoint(path, other, other_opt) == {"step": 4}
    for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b), name
    for i in range(len(list(model.parameters()))):
        want, got = opt.state_dict()["state"][i], other_opt.state_dict()["state"][i]
        assert torch.equal(want["exp_avg"], got["exp_avg"]) and torch.equal(want["exp_avg_sq"], got["exp_avg_sq"])
    assert set(ckpt.read_weights(path)) == set(model.state_dict())  # read by the current names
    assert "0.w_down" in ckpt.describe(path)["tensors"]


def test_new_checkpoints_are_format_3_without_shape_suffixes(tmp_path):
    model, opt = _leaves_and_opt(0)
    path = _save(tmp_path, 1, model, opt)
    assert ckpt.checkpoint_format(path) == ckpt.FORMAT_VERSION == 3
    stored = sharded.stored_tensors(path) | sharded.stored_tensors(path, sharded.OPTIM_DIR)
    assert not any(old in key for key in stored for old in sharded.RENAMED)


def test_format_1_is_refused_with_one_line(tmp_path):
    model, opt = _model_and_opt()
    path = _save(tmp_path, 1, model, opt)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(ckpt.CheckpointError, match=r"format 1, this version reads formats \[2, 3\]$"):
        ckpt.load_checkpoint(path, model, opt)


def test_resaving_a_step_replaces_it_and_keeps_one_copy(tmp_path):
    model, opt = _model_and_opt(0)
    _save(tmp_path, 1, model, opt)
    _save(tmp_path, 2, model, opt)
    newer, newer_opt = _model_and_opt(1)
    path = _save(tmp_path, 2, newer, newer_opt)  # a run resumed from step 1 reaches step 2 again
    assert path.name == "step_00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]
    loaded, _ = _model_and_opt(2)
    ckpt.load_checkpoint(path, loaded)
    assert all(torch.equal(a, b) for a, b in zip(newer.parameters(), loaded.parameters(), strict=True))


@pytest.mark.parametrize("crash_after", ["fresh-published", "old-deleted"])
def test_resave_interrupted_anywhere_leaves_a_complete_newest_copy(tmp_path, monkeypatch, crash_after):
    """Every move of a re-save is one rename or the deletion of a superseded copy: killed after
    any of them, the checkpoint found for the step is a complete one, the new one once it is
    published, and the next save tidies up."""
    model, opt = _model_and_opt(0)
    _save(tmp_path, 2, model, opt)
    newer, newer_opt = _model_and_opt(1)
    publishes = []
    real_publish = ckpt.atomic.publish

    def publish_then_maybe_crash(tmp, target):
        real_publish(tmp, target)
        publishes.append(target.name)
        if crash_after == "fresh-published" and len(publishes) == 1:
            raise KeyboardInterrupt("killed between publishing the new copy and deleting the old")

    real_rmtree = ckpt.shutil.rmtree

    def rmtree_then_crash(path, *args, **kw):
        real_rmtree(path, *args, **kw)
        if crash_after == "old-deleted":
            raise KeyboardInterrupt("killed after deleting the old copy, before the final rename")

    with monkeypatch.context() as patch:
        patch.setattr(ckpt.atomic, "publish", publish_then_maybe_crash)
        patch.setattr(ckpt.shutil, "rmtree", rmtree_then_crash)
        with pytest.raises(KeyboardInterrupt):
            _save(tmp_path, 2, newer, newer_opt)
    assert publishes[0] == "step_00000002.r1"
    found = ckpt.latest_valid_checkpoint(tmp_path, warn=print)
    assert found.name == "step_00000002.r1"
    loaded, _ = _model_and_opt(2)
    ckpt.load_checkpoint(found, loaded)
    assert all(torch.equal(a, b) for a, b in zip(newer.parameters(), loaded.parameters(), strict=True))
    assert ckpt.resolve_checkpoint_path(tmp_path, warn=print) == found
    _save(tmp_path, 3, newer, newer_opt, keep=2)  # the next save removes the superseded copy
    assert [(c.step, c.revision) for c in ckpt.list_checkpoints(tmp_path)] == [(3, 0), (2, 1)]
    _save(tmp_path, 2, model, opt, keep=2)  # and a re-save of a step found under .rN works too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]


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


def test_checksums_made_while_writing_match_the_files(tmp_path):
    import hashlib

    model, opt = _model_and_opt()
    path = _save(tmp_path, 1, model, opt)
    files = json.loads((path / ckpt.MANIFEST).read_text())["files"]
    assert {"model/.metadata", "optim/.metadata", "state.pt", "config.yaml"} <= set(files)
    for name, meta in files.items():
        data = (path / name).read_bytes()
        assert (meta["bytes"], meta["sha256"], meta["rank"]) == (len(data), hashlib.sha256(data).hexdigest(), 0)


def test_a_rank_hashes_the_files_it_wrote_and_sizes_all(tmp_path):
    model, opt = _model_and_opt()
    path = _save(tmp_path, 1, model, opt)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    shard = next(name for name in manifest["files"] if name.startswith("optim/__"))
    manifest["files"][shard]["rank"] = 1  # as if rank 1 had written it
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    data = bytearray((path / shard).read_bytes())
    data[-1] ^= 0xFF  # same size, other contents
    (path / shard).write_bytes(bytes(data))
    ckpt.verify_checkpoint(path, 0)  # rank 0 does not read rank 1's shard
    ckpt.verify_checkpoint(path, ckpt.SIZES_ONLY)
    for scope in (1, ckpt.ALL_FILES):
        with pytest.raises(ckpt.CheckpointError, match=f"{shard} is corrupted"):
            ckpt.verify_checkpoint(path, scope)


def test_ckpt_verify_checks_every_checkpoint_of_a_run(tmp_path, capsys):
    from sparse_train.cli import main

    model, opt = _model_and_opt()
    run = tmp_path / "run"
    older, newer = _save(run / "checkpoints", 1, model, opt), _save(run / "checkpoints", 2, model, opt)
    assert main(["ckpt", "verify", str(run)]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [(r["path"], r["ok"], r["step"]) for r in reports] == [(str(newer), True, 2), (str(older), True, 1)]
    shard = next((older / "model").glob("__*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1] + bytes([shard.read_bytes()[-1] ^ 1]))
    assert main(["ckpt", "verify", str(run)]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert reports[0]["ok"] and not reports[1]["ok"] and "is corrupted" in reports[1]["error"]
    assert main(["ckpt", "verify", str(older)]) == 1
    assert main(["ckpt", "verify", str(tmp_path / "nothing")]) == 2


def test_a_load_checksums_the_shards_with_its_own_reads(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    path = _save(tmp_path, 1, model, opt)
    files = json.loads((path / ckpt.MANIFEST).read_text())["files"]
    hashed = ckpt.shards_to_hash({"files": files}, rank=0, world_size=1)
    assert sorted(hashed) == sorted(n for n in files if n.endswith(".distcp"))
    opened: list[str] = []
    real_open = type(path).open

    def counting_open(self, mode="r", *args, **kwargs):
        if "b" in mode and self.suffix == ".distcp":
            opened.append(self.name)
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(type(path), "open", counting_open)
    other, other_opt = _model_and_opt(1)
    digests = ckpt.load_sharded(path, other, other_opt, distributed=False, hashed=hashed)
    assert len(opened) == len(hashed), "each shard file opened once: by the load, hashed as it is read"
    for name in [*hashed, "model/.metadata", "optim/.metadata"]:
        assert (digests[name]["bytes"], digests[name]["sha256"]) == (files[name]["bytes"], files[name]["sha256"])


def test_a_partial_load_still_hashes_the_whole_file(tmp_path):
    model, opt = _model_and_opt()
    path = _save(tmp_path, 1, model, opt)
    files = json.loads((path / ckpt.MANIFEST).read_text())["files"]
    first = nn.Sequential(nn.Linear(4, 4))  # reads only "0.*" of the stored tensors
    digests = sharded.load_model(path, first, distributed=False, partial=True, hashed=["model/__0_0.distcp"])
    assert digests["model/__0_0.distcp"]["sha256"] == files["model/__0_0.distcp"]["sha256"]
    assert torch.equal(first[0].weight, model[0].weight)


@pytest.mark.parametrize("where", ["model", "optim"])
def test_a_shard_corrupted_on_disk_is_found_by_the_load(tmp_path, where):
    model, opt = _model_and_opt()
    path = _save(tmp_path, 1, model, opt)
    shard = next((path / where).glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # same size: only a checksum sees it
    shard.write_bytes(bytes(raw))
    ckpt.verify_checkpoint(path, ckpt.SIDE_FILES)  # what a resume checks before loading
    other, other_opt = _model_and_opt(1)
    with pytest.raises(ckpt.CorruptCheckpoint, match=f"{where}/{shard.name} is (corrupted|unreadable)|unreadable"):
        ckpt.load_checkpoint(path, other, other_opt)


def test_each_shard_is_hashed_by_exactly_one_rank_of_any_world():
    files = {f"model/__{r}_0.distcp": {"rank": r} for r in range(4)} | {"model/.metadata": {"rank": 0}}
    files |= {"state.pt": {"rank": 0}, "optim/__1_0.distcp": {"rank": 1}}
    for world in (1, 2, 3, 4, 8):
        owners = [ckpt.shards_to_hash({"files": files}, r, world) for r in range(world)]
        flat = sorted(n for names in owners for n in names)
        assert flat == sorted(n for n in files if n.endswith(".distcp")), world


def _start(dir_, step, model, opt, **kw):
    weights, optim_state = sharded.model_state(model), sharded.optimizer_state(model, opt)
    return ckpt.start_checkpoint(
        dir_, step, weights, optim_state, {"step": step}, "train: {}\n", keep=10, groups=None, **kw
    )


def test_an_asynchronous_save_records_its_step_and_is_published_only_when_written(tmp_path, monkeypatch):
    import threading

    model, opt = _model_and_opt()
    _save(tmp_path, 1, model, opt)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    release, publishing = threading.Event(), threading.Event()
    publish = ckpt._publish_step

    def held(tmp, checkpoints_dir, step):
        publishing.set()
        release.wait(30)
        return publish(tmp, checkpoints_dir, step)

    monkeypatch.setattr(ckpt, "_publish_step", held)
    pending = _start(tmp_path, 2, model, opt)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on while the shards are written: the copy taken at the start is saved
    assert publishing.wait(30)
    assert (tmp_path / ".step_00000002.tmp" / "manifest.json").is_file()  # written, not yet published
    assert ckpt.latest_valid_checkpoint(tmp_path, warn=print).name == "step_00000001"
    release.set()
    assert pending.wait() == tmp_path / "step_00000002" == pending.path
    ckpt.verify_checkpoint(pending.path)  # digests made by the background writer
    loaded = ckpt.read_weights(pending.path)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert ckpt.read_trainer_state(pending.path) == {"step": 2}


def test_a_crash_during_an_asynchronous_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    _save(tmp_path, 1, model, opt)

    def crash(tmp, _checkpoints_dir, _step):
        raise OSError("disk gone mid-save")

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "_publish_step", crash)
        pending = _start(tmp_path, 2, model, opt)
        with pytest.raises(OSError, match="disk gone"):
            pending.wait()  # the writer's failure reaches whoever waits: the next save, or the end of training
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [1]
    assert ckpt.latest_valid_checkpoint(tmp_path, warn=print).name == "step_00000001"
    _start(tmp_path, 3, model, opt).wait()  # the next save cleans the leftover
    assert not list(tmp_path.glob(".step_*"))
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [3, 1]


def test_asynchronous_and_synchronous_training_write_the_same_checkpoints(tmp_path):
    from sparse_train.train.trainer import Trainer
    from tests.conftest import tiny_config

    runs = {}
    for mode in ("false", "true"):
        run = tmp_path / mode
        trainer = Trainer(
            tiny_config("train.steps=6", "checkpoint.every=2", f"checkpoint.async_save={mode}"), run, log=print
        )
        summary = trainer.fit()
        trainer.close()
        assert summary.checkpoint == run / "checkpoints" / "step_00000006" and summary.checkpoint.is_dir()
        runs[mode] = run / "checkpoints"
    for step in (2, 4, 6):
        sync, background = (ckpt.verify_checkpoint(runs[m] / ckpt.step_dir_name(step)) for m in ("false", "true"))
        shards = {n: m["sha256"] for n, m in sync["files"].items() if n.endswith(".distcp")}
        assert shards == {n: m["sha256"] for n, m in background["files"].items() if n.endswith(".distcp")}, step
        for path in (runs[m] / ckpt.step_dir_name(step) for m in ("false", "true")):
            assert ckpt.read_trainer_state(path)["step"] == step


def test_the_async_key_is_named_async_save():
    from sparse_train.config import ConfigError, compose_config

    assert compose_config({"checkpoint": {"async_save": True}}).checkpoint.async_save
    with pytest.raises(ConfigError, match="checkpoint.async.*did you mean 'async_save'"):
        compose_config({"checkpoint": {"async": True}})


def test_an_explicit_resume_of_a_checkpoint_corrupted_inside_a_shard_stops_with_the_error(tmp_path):
    from sparse_train.train.trainer import Trainer
    from tests.conftest import tiny_config

    Trainer(tiny_config("train.steps=4", "checkpoint.every=2"), tmp_path, log=print).fit()
    newest = tmp_path / "checkpoints" / "step_00000004"
    shard = next((newest / "optim").glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # the sizes check out; the load's checksum does not
    shard.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CorruptCheckpoint, match="optim/.* is corrupted"):
        Trainer(tiny_config("train.steps=6", "checkpoint.every=2"), tmp_path, resume=str(newest), log=print)
    messages: list[str] = []
    resumed = Trainer(tiny_config("train.steps=6", "checkpoint.every=2"), tmp_path, resume="auto", log=messages.append)
    assert resumed.step == 2 and any("skipping checkpoint" in m and "corrupted" in m for m in messages)


def test_close_publishes_an_asynchronous_save_still_in_flight(tmp_path):
    from sparse_train.train.trainer import Trainer
    from tests.conftest import tiny_config

    trainer = Trainer(tiny_config("checkpoint.async_save=true"), tmp_path, log=print)
    trainer.train_step()
    path = trainer.save()  # returns at once: the path it will be published under
    trainer.close()  # e.g. after a failed step: the checkpoint taken before is still published
    assert ckpt.latest_valid_checkpoint(tmp_path / "checkpoints", warn=print) == path
    assert ckpt.read_trainer_state(path)["step"] == 1


def test_consolidating_reads_one_tensor_at_a_time(tmp_path, monkeypatch):
    """`ckpt convert`: each tensor read through DCP just before it is written, never the whole model."""
    from safetensors.torch import load_file

    model, opt = _model_and_opt()
    path = _save(tmp_path / "ckpts", 4, model, opt)
    reads: list[str] = []
    read_tensor = sharded.read_tensor

    def counting(directory, name, *args):
        reads.append(name)
        return read_tensor(directory, name, *args)

    monkeypatch.setattr(sharded, "read_tensor", counting)
    monkeypatch.setattr(sharded, "read_full", lambda *a, **k: pytest.fail("the whole model was read"))
    out = ckpt.consolidate(path, tmp_path / "whole.safetensors")
    whole = load_file(str(out))
    assert sorted(reads) == sorted(model.state_dict()), "each tensor read once"
    assert all(torch.equal(whole[name], t) for name, t in model.state_dict().items())
