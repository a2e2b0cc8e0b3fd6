"""examples/train.py with 2 processes on gloo (DDP, then FSDP2 ``fully_shard``) ends with the same
parameters as one process on the full batch."""

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import vitkern

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ARGS = [
    "--steps", "3", "--global-batch", "8", "--optimizer", "sgd", "--lr", "0.05", "--log-every", "0", "--device", "cpu",
]

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


@pytest.fixture
def train_script(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the spawned processes inherit sys.path
    import train

    # spawned processes read these at import: the CPU reference ops, one thread each
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("VITKERN_BACKEND", "reference")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    return train


def test_two_processes_ddp_and_fsdp_match_single_process(tmp_path, train_script):
    from safetensors.torch import load_file

    start = time.perf_counter()
    with vitkern.use_backend("reference"):
        summary = train_script.main([*ARGS, "--save", str(tmp_path / "single.safetensors")])
    assert summary["world_size"] == 1 and summary["parallel"] == "none"
    single = load_file(tmp_path / "single.safetensors")

    # One spawn of 2 gloo processes running the script's main twice: DDP, then FSDP2.
    runs = [[*ARGS, "--parallel", p, "--save", str(tmp_path / f"{p}.safetensors")] for p in ("ddp", "fsdp")]
    train_script.launch(2, runs)

    torch.manual_seed(0)
    initial = train_script.build_model(train_script.parse_args(ARGS), torch.device("cpu")).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in single.items())  # it trained
    for parallel in ("ddp", "fsdp"):
        params = load_file(tmp_path / f"{parallel}.safetensors")
        assert set(params) == set(single)
        for k, v in single.items():
            torch.testing.assert_close(params[k], v, atol=1e-5, rtol=1e-5, msg=lambda m: f"{parallel} {k}: {m}")
    print(f"distributed training test: {time.perf_counter() - start:.1f} s")
