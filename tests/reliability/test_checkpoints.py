"""Checkpoint files under faults: a kill or a full disk during the write never replaces the previous good file,
and a damaged file (flipped bytes, truncated, empty) is refused with one line before anything is restored."""

from __future__ import annotations

import os
import resource
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import open_dict

from manifoldnorm.lit import run
from manifoldnorm.lit.checkpoint import AtomicCheckpointIO, CheckpointError, atomic_save, verify_checkpoint

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------- damaging helpers
def flip_tensor_byte(src: Path, dst: Path) -> None:
    """Copy ``src`` with one bit flipped in the middle of its largest tensor record (its data, not a header)."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        rec = max((z for z in zf.infolist() if "/data/" in z.filename), key=lambda z: z.file_size)
    h = rec.header_offset
    name_len, extra_len = struct.unpack("<HH", data[h + 26:h + 30])
    data[h + 30 + name_len + extra_len + rec.file_size // 2] ^= 0x04
    dst.write_bytes(bytes(data))


def truncate(src: Path, dst: Path) -> None:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size * 2 // 3])


def empty(src: Path, dst: Path) -> None:  # noqa: ARG001 - same signature as the other damages
    dst.write_bytes(b"")


DAMAGES = {"flipped": (flip_tensor_byte, "fails its CRC-32 check"), "truncated": (truncate, "truncated"),
           "empty": (empty, "is empty")}


# ------------------------------------------------------------------------------------------ a tiny Lightning run
class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.register_buffer("running_mean", torch.eye(4))  # stands for an SPD running mean
        self.steps = 0

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.steps += 1
        return self.layer(batch[0]).pow(2).mean()

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("test/loss", self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=8)

    test_dataloader = train_dataloader


def tiny_trainer(root: Path, **kwargs: object) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 1)
    return pl.Trainer(default_root_dir=root, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                      callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", filename="last")], **kwargs)


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    tiny_trainer(root).fit(Tiny())
    path = root / "checkpoints" / "last.ckpt"
    verify_checkpoint(path)
    return path


# ------------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_refused_before_training(damage: str, good_ckpt: Path, tmp_path: Path) -> None:
    fn, what = DAMAGES[damage]
    bad = tmp_path / "bad.ckpt"
    fn(good_ckpt, bad)
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint(bad)
    msg = str(info.value)
    assert "\n" not in msg and str(bad) in msg and what in msg, msg
    module = Tiny()
    with pytest.raises(CheckpointError, match=what):  # Lightning's load path (the plugin) refuses it too
        tiny_trainer(tmp_path / "resumed", max_epochs=2).fit(module, ckpt_path=bad)
    assert module.steps == 0  # refused before any training step
    with pytest.raises(CheckpointError, match=what):  # and so does testing a damaged best checkpoint
        tiny_trainer(tmp_path / "tested").test(Tiny(), ckpt_path=bad, verbose=False)
    with pytest.raises(CheckpointError, match=what):  # the entry point's early check
        run.check_resume_checkpoint(bad)


def test_flipped_byte_loads_silently_without_the_check(good_ckpt: Path, tmp_path: Path) -> None:
    """Why the check exists: torch.load takes the damaged file and returns changed weights."""
    bad = tmp_path / "bad.ckpt"
    flip_tensor_byte(good_ckpt, bad)
    a, b = torch.load(good_ckpt, weights_only=False), torch.load(bad, weights_only=False)
    assert any(not torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_code_is_refused_in_one_line_and_never_runs(tmp_path: Path) -> None:
    """A checkpoint whose pickle calls a function (here os.system) is a valid zip: the load refuses it (weights-only
    unpickling) with one line naming the file and the blocked global; the code never runs."""
    marker, evil = tmp_path / "ran", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, evil)
    verify_checkpoint(evil)  # the archive itself is intact
    module = Tiny()
    with pytest.raises(CheckpointError) as info:
        tiny_trainer(tmp_path / "resumed", max_epochs=2).fit(module, ckpt_path=evil)
    msg = str(info.value)
    assert "\n" not in msg and str(evil) in msg and "system" in msg, msg
    assert module.steps == 0 and not marker.exists()


def test_not_a_zip_checkpoint_and_missing_file_refused(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="not a torch.save zip archive"):
        verify_checkpoint(legacy)
    with pytest.raises(CheckpointError, match="no such file"):
        run.check_resume_checkpoint(tmp_path / "missing.ckpt")
    run.check_resume_checkpoint("last")  # Lightning's keywords pass through


@pytest.mark.parametrize("damage", [
    "flipped", pytest.param("truncated", marks=pytest.mark.slow), pytest.param("empty", marks=pytest.mark.slow)])
def test_damaged_checkpoint_refused_by_train_py_in_one_line(damage: str, good_ckpt: Path, tmp_path: Path) -> None:
    """The entry point refuses the file before building anything: exit status 1, one ``Error:`` line, no
    traceback (today: silently loaded, a raw ``OSError [Errno 22]``, a raw ``EOFError``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "WANDB_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", MANIFOLDNORM_CACHE=str(tmp_path / "cache"))
    fn, what = DAMAGES[damage]
    bad = tmp_path / f"{damage}.ckpt"
    fn(good_ckpt, bad)
    proc = subprocess.run(
        [sys.executable, "launch/train.py", f"paths.log_dir={tmp_path / 'outputs'}", "logger=none",
         f"ckpt_path={bad}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and what in errors[0], proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ atomic writes
def test_atomic_save_replaces_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    atomic_save({"epoch": 1}, path)
    atomic_save({"epoch": 2}, path)
    assert torch.load(path)["epoch"] == 2 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # like open(): not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_then_big(path: Path, r: int, w: int) -> None:
    """The child of :func:`test_kill_during_write_keeps_the_previous_checkpoint` (forked: no import cost)."""
    os.close(r)
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1, "w": torch.full((1000,), 1.0)}, path)
    os.write(w, b"good")
    io.save_checkpoint({"epoch": 2, **{f"w{i}": torch.full((4_000_000,), 2.0) for i in range(40)}}, path)


def test_kill_during_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """SIGKILL the writer while its temporary file grows (40 x 16 MB tensors): last.ckpt stays the old one."""
    path = tmp_path / "last.ckpt"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _write_then_big(path, r, w)
        finally:
            os._exit(0)
    os.close(w)
    killed_at = None
    try:
        assert os.read(r, 4) == b"good"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and killed_at is None:
            tmps = list(tmp_path.glob(".last.ckpt.*.tmp"))
            size = tmps[0].stat().st_size if tmps else 0
            if size > 64 * 2**20:  # well inside the ~640 MB write
                os.kill(pid, signal.SIGKILL)
                killed_at = size
            time.sleep(0.0005)
    finally:
        if killed_at is None:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(r)
    assert killed_at is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    verify_checkpoint(path)
    state = torch.load(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.full((1000,), 1.0))
    assert len(list(tmp_path.glob(".last.ckpt.*.tmp"))) == 1  # the killed write's stray temporary file


def test_failed_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """A write that fails half-way (a file size limit: EFBIG, which any user can set) raises one clear line
    and leaves the previous file and no temporary file."""
    path = tmp_path / "last.ckpt"
    atomic_save({"epoch": 1}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
    try:
        with pytest.raises(CheckpointError) as info:
            atomic_save({"epoch": 2, "w": torch.zeros(2**20)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    msg = str(info.value)
    assert msg.startswith(f"could not write checkpoint {path}") and "previous last.ckpt" in msg, msg
    assert "File too large" in msg and "\n" not in msg
    assert torch.load(path)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (disk-full test) needs root; CI runs this test as root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (mount: {res.stderr.strip()}); the disk-full test needs it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_keeps_the_previous_checkpoint(small_tmpfs: Path) -> None:
    path = small_tmpfs / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1, "w": torch.ones(100_000)}, path)  # 400 kB of the 2 MB
    with pytest.raises(CheckpointError) as info:
        io.save_checkpoint({"epoch": 2, "w": torch.ones(1_000_000)}, path)  # 4 MB: does not fit
    msg = str(info.value)
    assert "disk full" in msg and str(path) in msg and "previous last.ckpt" in msg and "\n" not in msg, msg
    verify_checkpoint(path)
    state = io.load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(100_000))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # the partial temporary file is gone


# ------------------------------------------------------------------------------------ wired into every trainer
@pytest.mark.parametrize("overrides", [[], ["trainer=ddp_cpu"], ["trainer=ddp_cpu", "sync_norm=true"],
                                       ["trainer=ddp"], ["trainer=gpu"]])
def test_every_trainer_config_writes_atomically(overrides: list[str], tmp_path: Path) -> None:
    from manifoldnorm.lit.checkpoint import CarryBestCheckpoint
    from manifoldnorm.lit.sync import RiemannianSyncBatchNorm

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", "logger=none", *overrides])
    with open_dict(cfg):
        cfg.trainer.accelerator = "cpu"  # gpu configs built on CPU: the plugin wiring is what is checked
        cfg.trainer.devices = 2 if "ddp" in cfg.trainer.get("strategy", {}).get("_target_", "") else 1
        if "process_group_backend" in (cfg.trainer.get("strategy") or {}):
            cfg.trainer.strategy.process_group_backend = "gloo"
    trainer = run.build_trainer(cfg, run.build_callbacks(cfg), [])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(cb, CarryBestCheckpoint) for cb in trainer.callbacks)
    assert isinstance(getattr(trainer.strategy, "_layer_sync", None), RiemannianSyncBatchNorm) == bool(
        cfg.get("sync_norm"))  # the sync plugin is kept beside the checkpoint plugin
