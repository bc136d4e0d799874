"""Every command documented in ``examples/`` and the README's single-process run, the way a user
runs them: a subprocess from the repository root, the command as written (only the example paths
``DIR`` / ``/tmp/tiny`` / the output directory replaced by temporary ones).

``python examples/tiny_cpu_prepare.py DIR`` hung as a script (it converted in the main process and
then forked a rank that converted again), and ``slurm/submit.sh`` was not executable: the tests
called the prepare function inside pytest and the launcher through ``bash``.

The Slurm submissions of the tiny recipes run for real in ``tests/test_slurm_cluster.py`` (on the
directory this script prepares); here their ``--dry-run`` twins run, which need no Slurm. The GPU
recipes' submissions cannot run here; their documented ``--dry-run`` lines do.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The commands the examples document, written out by hand: a new one must be added here (and is
# then run below).
EXPECTED = [
    "python examples/evaluation/demo_report.py --out examples/evaluation/output",
    "slurm/submit.sh --dry-run examples/exopd-qwen3-1.7b-reward-correction-moe-hosted.sh",
    "slurm/submit.sh --dry-run examples/exopd-qwen3-1.7b-reward-correction-served.sh",
    "slurm/submit.sh --dry-run examples/exopd-qwen3-1.7b-reward-correction.sh",
    "slurm/submit.sh --dry-run examples/exopd-qwen3-1.7b-strong-to-weak.sh",
    "slurm/submit.sh --dry-run examples/exopd-qwen3-4b-disaggregated.sh",
    "slurm/submit.sh --dry-run examples/exopd-qwen3-4b-multi-teacher.sh",
    "slurm/submit.sh --dry-run examples/exopd-qwen3-4b.sh",
    "slurm/submit.sh examples/exopd-qwen3-4b.sh",
    "python examples/tiny_cpu_prepare.py /tmp/tiny",
    "slurm/submit.sh --site slurm/ci/site.sh --set TINY_DIR=/tmp/tiny examples/tiny-cpu-disaggregated.sh",
    "python examples/tiny_cpu_prepare.py /tmp/tiny",
    "slurm/submit.sh --site slurm/ci/site.sh --set TINY_DIR=/tmp/tiny examples/tiny-cpu-score.sh",
    "python examples/tiny_cpu_prepare.py /tmp/tiny",
    "slurm/submit.sh --site slurm/ci/site.sh --set TINY_DIR=/tmp/tiny examples/tiny-cpu-served-teacher.sh",
    "python examples/tiny_cpu_prepare.py /tmp/tiny",
    "slurm/submit.sh --site slurm/ci/site.sh --set TINY_DIR=/tmp/tiny examples/tiny-cpu-train.sh",
    "python examples/tiny_cpu_prepare.py DIR",
]


def documented_commands() -> list[str]:
    """Command lines in the examples' headers: ``#   CMD  # note`` in recipes, indented ``python``
    lines in the scripts' docstrings."""
    out = []
    for path in sorted((REPO / "examples").rglob("*")):
        if path.suffix not in (".sh", ".py") or "output" in path.parts:
            continue
        for line in path.read_text().splitlines():
            m = re.match(r"^#?\s{3,}((?:python|slurm/submit\.sh) .*?)(?:\s{2,}#.*)?$", line)
            if m:
                out.append(m.group(1).strip())
    return out


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GOPD_SITE"))}
    # "python" as the user's shell finds it: this environment's interpreter first on PATH
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_documented(command: str, timeout: float, **subs: str) -> subprocess.CompletedProcess:
    for old, new in subs.items():
        command = command.replace(old, new)
    return subprocess.run(
        ["bash", "-c", command],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_documented_commands_are_these():
    assert documented_commands() == EXPECTED


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``python examples/tiny_cpu_prepare.py DIR``, as a script (it used to hang for 300 s)."""
    out = tmp_path_factory.mktemp("examples") / "tiny"
    proc = run_documented("python examples/tiny_cpu_prepare.py DIR", 300, DIR=str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote the tiny models, checkpoints and data under {out}" in proc.stdout
    return out


def test_tiny_cpu_prepare_as_a_script(tiny):
    for name in ("mcore", "student", "teacher", "teacher_base"):
        assert (tiny / name / "gopd_model.json").is_file(), name
        assert (tiny / name / "checksums.json").is_file(), name
    for name in ("hf/config.json", "tokens.jsonl", "train.jsonl", "eval.jsonl"):
        assert (tiny / name).is_file(), name


@pytest.mark.parametrize(
    "recipe",
    [
        "tiny-cpu-score.sh",
        "tiny-cpu-train.sh",
        "tiny-cpu-disaggregated.sh",
        "tiny-cpu-served-teacher.sh",
    ],
)
def test_tiny_recipes_plan_on_the_prepared_directory(tiny, recipe):
    """The documented submission, as its dry run: the plan runs the entry point on the files
    the prepare script wrote."""
    command = next(c for c in EXPECTED if c.endswith(recipe))
    proc = run_documented(
        command.replace("slurm/submit.sh ", "slurm/submit.sh --dry-run "),
        60,
        **{"/tmp/tiny": str(tiny)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    entry = "megatron_gopd.scoring" if "score" in recipe else "megatron_gopd.train"
    assert entry in proc.stdout
    text = (REPO / "examples" / recipe).read_text()
    for flag, arg in re.findall(r'(--[\w-]+) "\$TINY_DIR/([^"]+)"', text):
        assert str(tiny / arg) in proc.stdout, arg
        if flag not in ("--output", "--save", "--load"):  # inputs, not the job's outputs
            assert (tiny / arg).exists(), arg


@pytest.mark.parametrize(
    "command", [c for c in EXPECTED if c.startswith("slurm/submit.sh --dry-run")]
)
def test_recipe_dry_runs_as_documented(command):
    proc = run_documented(command, 60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "## submit (on this host)" in proc.stdout and "-m megatron_gopd.train" in proc.stdout


def test_evaluation_demo_report_as_documented(tmp_path):
    out = tmp_path / "output"
    proc = run_documented(EXPECTED[0], 300, **{"examples/evaluation/output": str(out)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "comparison.md").is_file() and (out / "accuracy_length_vs_lambda.png").is_file()


def test_readme_says_one_process_needs_no_torchrun():
    """The single-process command itself runs in ``test_checkpoints.py``
    (``test_single_process_run_then_damaged_resume``: ``gopd-train ...``, no launcher)."""
    readme = (REPO / "README.md").read_text()
    assert "needs no torchrun" in readme
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    assert any(b.lstrip().startswith("gopd-train ") for b in blocks), "no single-process example"
