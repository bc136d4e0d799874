"""Bad input and a hostile environment get one line, not a traceback, and before the work.

The cases the issue found: binary garbage where text is expected (prompt data, ``gopd-score``
input, a benchmark file, a config file), a shard index naming a tensor its shard lacks, a garbage
parquet benchmark, and outputs that cannot be written (checked up front: before, each tool did its
whole job and then died writing). Without ``--save`` the trainer kept its rollout files in the
current directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from megatron_gopd.utils import GopdError
from tests.e2e_utils import make_world, train_args

REPO = Path(__file__).resolve().parents[1]
GARBAGE = bytes([0x94, 0xFF, 0x00, 0xC3, 0x28]) * 600  # not UTF-8 from the first byte


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("cli_errors"))


# ---------------------------------------------------------------------------------- garbage input


def test_binary_prompt_data(world, tmp_path):
    from megatron_gopd.trainer.config import build_config, parse_args
    from megatron_gopd.trainer.preflight import load_tokenizer, validate_inputs

    data = tmp_path / "prompts.jsonl"
    data.write_bytes(GARBAGE)
    argv = train_args(world, tmp_path / "run", "--teacher-load", str(world["teacher"]))
    argv[argv.index("--prompt-data") + 1] = str(data)
    cfg = build_config(parse_args(argv))
    with pytest.raises(GopdError, match=rf"prompt data {data} is not UTF-8 text \(byte 0x94 at 0"):
        validate_inputs(cfg, load_tokenizer(cfg))


def test_binary_score_input(tmp_path):
    from megatron_gopd.scoring import _read_inputs

    path = tmp_path / "tokens.jsonl"
    path.write_bytes(b'{"input_ids": [1, 2], "prompt_len": 1}\n' + GARBAGE)
    with pytest.raises(GopdError, match=rf"input {path} is not UTF-8 text \(byte 0x94 at 39"):
        _read_inputs(path, None)


def test_binary_config_file(tmp_path):
    from megatron_gopd.trainer.config import parse_args

    path = tmp_path / "run.yaml"
    path.write_bytes(GARBAGE)
    with pytest.raises(GopdError, match=rf"config {path} is not UTF-8 text"):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".json"])
def test_garbage_benchmark_file(tmp_path, suffix):
    from megatron_gopd.evaluation.benchmarks import BenchmarkSpec, load_benchmark

    path = tmp_path / f"aime{suffix}"
    path.write_bytes(GARBAGE)
    with pytest.raises(GopdError, match=rf"benchmark file {path}"):
        load_benchmark(BenchmarkSpec("aime", "math", str(path)))
    if suffix == ".json":  # text, but not JSON
        path.write_text('[{"problem": "1+1", "answer": "2"}')
        with pytest.raises(GopdError, match=rf"benchmark file {path} is not valid JSON"):
            load_benchmark(BenchmarkSpec("aime", "math", str(path)))


def test_index_naming_a_tensor_missing_from_its_shard(world, tmp_path):
    """``model.safetensors.index.json`` sends a tensor to a shard that does not hold it."""
    from megatron_gopd.convert.hf_io import write_hf_checkpoint
    from megatron_gopd.testing import RankFailure, run_distributed
    from tests.test_parity_hf import _convert

    src = world["teacher"].parent / "hf" / "teacher"
    write_hf_checkpoint(
        tmp_path / "hf",
        load_file(src / "model.safetensors"),
        json.loads((src / "config.json").read_text()),
        max_shard_bytes=100_000,
    )
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    right = index["weight_map"][name]
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != right)
    index["weight_map"][name] = wrong
    index_path.write_text(json.dumps(index))
    with pytest.raises(RankFailure) as e:
        run_distributed(_convert, 1, str(tmp_path / "hf"), str(tmp_path / "out"))
    lines = [ln for ln in str(e.value).splitlines() if ln.startswith("megatron_gopd.utils.Gopd")]
    assert lines and f"{name} is not in {wrong}, where the shard index" in lines[-1], str(e.value)[
        -2000:
    ]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- outputs


def _read_only_dir_command(ro: Path, commands: list[list[str]], logs: Path) -> list[int]:
    """Run ``commands`` one after the other in a private mount namespace in which ``ro`` is a
    read-only file system (as for a full or read-only scratch mount; permissions alone would not
    stop root); each one's stderr goes to ``logs/<i>.err``. Returns their exit statuses."""
    script = ['mount -t tmpfs -o ro,size=1m tmpfs "$RO" || exit 97']
    for i, cmd in enumerate(commands):
        quoted = " ".join("'" + c.replace("'", "'\\''") + "'" for c in cmd)
        script.append(f'{quoted} > "$LOGS/{i}.out" 2> "$LOGS/{i}.err"; echo $? >> "$LOGS/rc"')
    unshare = ["unshare", "-m", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare.insert(1, "-r")
    env = dict(os.environ, RO=str(ro), LOGS=str(logs), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [*unshare, "bash", "-c", "\n".join(script)], env=env, timeout=600, capture_output=True
    )
    assert proc.returncode != 97, proc.stderr.decode()[-2000:]
    return [int(x) for x in (logs / "rc").read_text().split()]


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_unwritable_outputs_fail_before_the_work(world, tmp_path):
    """Every tool checks that its output can be written before it starts: one line naming the
    flag and the path, exit status 2, and none of the work (no conversion, no model, no rollout)
    done first."""
    ro, logs = tmp_path / "ro", tmp_path / "logs"
    ro.mkdir()
    logs.mkdir()
    hf = world["teacher"].parent / "hf" / "teacher"
    tokens = tmp_path / "tokens.jsonl"
    tokens.write_text('{"input_ids": [1, 2, 3, 4], "prompt_len": 2}\n')
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"problem": "1+1?", "answer": "2"}\n')
    bindir = Path(sys.executable).parent
    py = sys.executable
    student, teacher = str(world["student"]), str(world["teacher"])
    to_hf = [py, str(REPO / "tools/convert_megatron_to_hf.py"), "--load", student]
    score = [str(bindir / "gopd-score"), "--load", student, "--input", str(tokens)]
    evaluate = [str(bindir / "gopd-eval"), "--hf-model", str(hf), "--benchmark", f"m=math:{bench}"]
    train = [
        str(bindir / "gopd-train"),
        *train_args(world, ro / "unused", "--teacher-load", teacher),
        *("--tensor-model-parallel-size", "1"),
    ]
    cases = [
        ([py, str(REPO / "tools/convert_hf_to_megatron.py"), "--hf-dir", str(hf)], "--out", "mc"),
        (to_hf, "--out", "sub/hf"),
        (score, "--output", "logprobs.jsonl"),
        (evaluate, "--output-dir", "eval"),
        (train, "--save", "run"),
    ]
    cases = [(cmd, flag, ro / out) for cmd, flag, out in cases]
    rcs = _read_only_dir_command(ro, [[*cmd, flag, str(out)] for cmd, flag, out in cases], logs)
    for i, ((_, flag, out), rc) in enumerate(zip(cases, rcs, strict=True)):
        err = (logs / f"{i}.err").read_text()
        assert rc == 2 and "Traceback" not in err, (flag, rc, err[-3000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: {flag} {out} cannot be written"), last
        assert "Read-only file system" in last, last
        for work in ("converting", "rollout server", "Loading", "weights"):
            assert work not in err, (flag, err[-2000:])


# ---------------------------------------------------------------------------------- no --save


def test_without_save_no_rollout_files_in_the_current_directory(world, tmp_path, monkeypatch):
    from megatron_gopd.trainer.config import build_config, parse_args
    from megatron_gopd.trainer.preflight import load_tokenizer
    from megatron_gopd.trainer.rollout_side import RolloutSide

    monkeypatch.chdir(tmp_path)
    argv = train_args(world, tmp_path / "unused", "--teacher-load", str(world["teacher"]))
    del argv[argv.index("--save") : argv.index("--save") + 2]
    cfg = build_config(parse_args(argv))
    side = RolloutSide(cfg, load_tokenizer(cfg))
    workdir = side.workdir.resolve()
    assert tmp_path not in [workdir, *workdir.parents], workdir
    side.workdir.mkdir(parents=True, exist_ok=True)
    (side.workdir / "init_hf").mkdir()
    side.shutdown()
    assert not workdir.exists(), "the temporary rollout directory outlived the run"
    assert list(tmp_path.iterdir()) == []
