"""gopd-train's up-front validation: every user mistake is one clear error, before any model is
built. One test per case named in the issue, plus the YAML config file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gopd.trainer.config import build_config, parse_args
from megatron_gopd.utils import GopdError
from tests.e2e_utils import make_world, train_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("validation"))


def _validate(argv):
    from megatron_gopd.trainer.preflight import load_tokenizer, validate_inputs

    cfg = build_config(parse_args(argv))
    inputs = validate_inputs(cfg, load_tokenizer(cfg))
    return inputs.prompts, inputs.eval_prompts


def _args(world, tmp_path, *extra):
    return train_args(world, tmp_path / "run", "--teacher-load", str(world["teacher"]), *extra)


def test_valid_arguments_pass(world, tmp_path):
    prompts, eval_prompts = _validate(_args(world, tmp_path))
    assert len(prompts) == 64 and len(eval_prompts) == 16
    assert prompts[0].metadata["answer"] and prompts[0].domain == "math"


def test_domain_without_teacher(world, tmp_path):
    argv = train_args(world, tmp_path / "run", "--teacher-load", f"math={world['teacher']}")
    argv[argv.index("--prompt-data") + 1] = str(world["train2"])  # math and code prompts
    with pytest.raises(
        GopdError, match=r"train2.jsonl:2: domain 'code' has no teacher .*--teacher-load code=PATH"
    ):
        _validate(argv)


@pytest.mark.parametrize("value", ["-0.5", "nan", "math=-1"])
def test_negative_lambda(world, tmp_path, value):
    with pytest.raises(GopdError, match="lambda must be finite and >= 0"):
        build_config(parse_args(_args(world, tmp_path, "--gopd-lambda", value)))


def test_lambda_for_a_domain_without_teacher(world, tmp_path):
    argv = train_args(
        world,
        tmp_path / "run",
        "--teacher-load",
        f"math={world['teacher']}",
        "--gopd-lambda",
        "code=1.25",
    )
    with pytest.raises(GopdError, match="names domain 'code', which has no teacher"):
        build_config(parse_args(argv))


def test_reference_required_but_missing(world, tmp_path):
    missing = str(tmp_path / "no-such-base")
    with pytest.raises(GopdError, match=f"checkpoint {missing} does not exist"):
        _validate(_args(world, tmp_path, "--gopd-lambda", "1.25", "--ref-load", missing))
    # with lambda == 1 the reference is never needed, so a missing one is not an error
    _validate(_args(world, tmp_path, "--gopd-lambda", "1", "--ref-load", missing))


def test_mismatched_vocabularies(world, tmp_path):
    import shutil

    other = tmp_path / "other_teacher"
    shutil.copytree(world["teacher"], other)
    meta = json.loads((other / "gopd_model.json").read_text())
    meta["arch"]["vocab_size"], meta["arch"]["tokenizer_vocab_size"] = 512, 500
    (other / "gopd_model.json").write_text(json.dumps(meta))
    student_vocab = json.loads((world["student"] / "gopd_model.json").read_text())["arch"][
        "tokenizer_vocab_size"
    ]
    argv = train_args(world, tmp_path / "run", "--teacher-load", str(other))
    with pytest.raises(
        GopdError, match=f"teacher vocabulary has 500 tokens, the student's has {student_vocab}"
    ):
        _validate(argv)


@pytest.mark.parametrize(
    "content,line,message",
    [
        ('{"prompt": "abc"}\n\n{"prompt": "cba"}\n', 2, "empty line"),
        ('{"prompt": "abc"}\n{"prompt": "ab\n', 2, "not valid JSON"),
        ('{"prompt": "abc"}\n[1, 2]\n', 2, "expected a JSON object"),
        ('{"prompt": "abc", "messages": []}\n', 1, "exactly one of 'prompt'"),
        ('{"prompt": ""}\n', 1, "non-empty string"),
        ('{"messages": [{"role": "user"}]}\n', 1, "'messages' must be a non-empty list"),
        ("", None, "is empty"),
    ],
)
def test_malformed_dataset_lines(world, tmp_path, content, line, message):
    data = tmp_path / "prompts.jsonl"
    data.write_text(content)
    argv = _args(world, tmp_path)
    argv[argv.index("--prompt-data") + 1] = str(data)
    where = f"{data}:{line}: " if line else ""
    with pytest.raises(GopdError, match=f"{where}.*{message}" if where else message):
        _validate(argv)


_NO_MODELS = (
    "import sys, megatron_gopd.trainer.stages as T\n"
    "def no(*a, **k): raise SystemExit('a model was built')\n"
    "T.build_role = no\n"
    "from megatron_gopd.train import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _cli_error(argv) -> str:
    """Run the real CLI (a world of one) with model building forbidden; return its error line."""
    proc = subprocess.run(
        [sys.executable, "-c", _NO_MODELS, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_unreachable_server_fails_before_any_model_is_built(world, tmp_path):
    argv = _args(
        world,
        tmp_path,
        "--rollout-engine",
        "external",
        "--rollout-urls",
        "http://127.0.0.1:9",
        "--tensor-model-parallel-size",
        "1",
    )
    assert _cli_error(argv) == "error: rollout server(s) http://127.0.0.1:9 do not answer /health"


def test_too_few_processes_for_the_layout(world, tmp_path):
    assert _cli_error(_args(world, tmp_path)).startswith(
        "error: 1 process(es) cannot hold TP*PP = 2*1 = 2 model shards"
    )


def test_flag_level_errors(world, tmp_path):
    with pytest.raises(
        GopdError, match="--global-batch-size 5 must divide the rollout batch of 8 prompts x 2"
    ):
        build_config(parse_args(_args(world, tmp_path, "--global-batch-size", "5")))
    with pytest.raises(GopdError, match="--rollout-prompts-per-request and"):
        build_config(parse_args(_args(world, tmp_path, "--rollout-prompts-per-request", "0")))
    with pytest.raises(GopdError, match="--rollout-engine external needs --rollout-urls"):
        build_config(parse_args(_args(world, tmp_path, "--rollout-engine", "external")))
    with pytest.raises(GopdError, match="--teacher-load is required"):
        build_config(parse_args(train_args(world, tmp_path / "run")))
    argv = _args(world, tmp_path, "--sequence-parallel")
    argv[argv.index("--tensor-model-parallel-size") + 1] = "1"
    with pytest.raises(
        GopdError, match="--sequence-parallel needs --tensor-model-parallel-size > 1"
    ):
        build_config(parse_args(argv))


def test_yaml_config_with_command_line_overrides(world, tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        f"student_load: {world['student']}\n"
        f"teacher_load: [math={world['teacher']}, code={world['teacher2']}]\n"
        "gopd_lambda: 1.25\n"
        "lr: 2.0e-5\n"
        "tensor_model_parallel_size: 2\n"
        f"prompt_data: {world['train2']}\n"
    )
    cfg = build_config(parse_args(["--config", str(cfg_file), "--lr", "3e-5"]))
    assert cfg.optim.lr == 3e-5  # the command line wins
    assert cfg.parallel.tp == 2 and cfg.routing.lam("math") == 1.25
    assert cfg.routing.teachers == {
        "math": str(world["teacher"]),
        "code": str(world["teacher2"]),
    }
    # a list flag on the command line replaces the file's list
    cfg = build_config(
        parse_args(["--config", str(cfg_file), "--teacher-load", str(world["teacher"])])
    )
    assert cfg.routing.teachers == {"default": str(world["teacher"])}
    cfg_file.write_text("tensor_model_parallel_sise: 2\n")
    with pytest.raises(GopdError, match="unknown key"):
        parse_args(["--config", str(cfg_file)])


# ---------------------------------------------------------------------------------- batches vs DP


def _trainer_until_models(argv):
    """GOPDTrainer's start-up on this rank with model building and the rollout forbidden: the
    error it raises first, or what it got to."""
    from megatron_gopd.trainer import stages as T

    def no_model(*a, **k):
        raise AssertionError("a model was built")

    def no_rollout(cfg, tokenizer):
        raise AssertionError("the rollout was started")

    T.build_role = no_model
    try:
        T.GOPDTrainer(build_config(parse_args(argv)), no_rollout)
    except GopdError as e:
        return str(e)


@pytest.mark.parametrize(
    "batch,message",
    [
        # 10 samples over 4 data-parallel ranks: 2 were silently dropped (trained on 8)
        (
            ["--rollout-batch-size", "5", "--n-samples-per-prompt", "2"],
            "update batch of 10 samples (--rollout-batch-size 5 x --n-samples-per-prompt 2) is not "
            "divisible by the 4 data-parallel ranks: each update would train on 8 and drop 2",
        ),
        (
            [
                "--rollout-batch-size",
                "4",
                "--n-samples-per-prompt",
                "3",
                "--global-batch-size",
                "6",
            ],
            "--global-batch-size 6 is not divisible by the 4 data-parallel ranks: each update "
            "would train on 4 and drop 2",
        ),
        # fewer samples than ranks: some ranks trained on all-masked rows
        (
            ["--rollout-batch-size", "1", "--n-samples-per-prompt", "2"],
            "update batch of 2 samples (--rollout-batch-size 1 x --n-samples-per-prompt 2) is "
            "smaller than the 4 data-parallel ranks",
        ),
    ],
)
def test_update_batch_must_fit_the_data_parallel_ranks(world, tmp_path, batch, message):
    """Refused up front (before the rollout servers or any model), naming the numbers."""
    from megatron_gopd.testing import run_distributed

    argv = _args(world, tmp_path, *batch)
    argv[argv.index("--tensor-model-parallel-size") + 1] = "1"
    errors = run_distributed(_trainer_until_models, 4, argv, timeout=120)
    assert all(e == errors[0] for e in errors)
    assert errors[0] is not None and message in errors[0], errors[0]


# ---------------------------------------------------------------------------------- odd values


@pytest.mark.parametrize("value", ["inf", "math=inf", "1e400"])
def test_infinite_lambda(world, tmp_path, value):
    with pytest.raises(GopdError, match="lambda must be finite and >= 0"):
        build_config(parse_args(_args(world, tmp_path, "--gopd-lambda", value)))


def test_zero_response_length(world, tmp_path):
    with pytest.raises(GopdError, match="--max-response-len must be >= 1"):
        build_config(parse_args(_args(world, tmp_path, "--max-response-len", "0")))


def test_teacher_without_tokenizer_and_another_vocabulary(world, tmp_path):
    """A 250-token teacher for the 15-token student, converted without its tokenizer: the rows
    cover the student's tokens, but nothing says they are the same tokens (the README promises an
    error for vocabularies that do not match)."""
    import shutil

    from megatron_gopd.testing import make_tiny_hf_model
    from tests.test_parity_hf import convert

    hf = tmp_path / "hf250"
    make_tiny_hf_model(hf, "qwen3", vocab_size=250)  # no tokenizer files
    convert(hf, tmp_path / "t250")
    assert (
        json.loads((tmp_path / "t250" / "gopd_model.json").read_text())["arch"][
            "tokenizer_vocab_size"
        ]
        is None
    )
    shutil.rmtree(hf)
    argv = train_args(world, tmp_path / "run", "--teacher-load", str(tmp_path / "t250"))
    with pytest.raises(
        GopdError, match=r"teacher vocabulary has 250 tokens, the student's has 15 .*no tokenizer"
    ):
        _validate(argv)


# ---------------------------------------------------------------------------------- domains


def _cli_stderr(argv) -> str:
    """The real CLI (a world of one) up to the first model, which it may not build: stderr."""
    proc = subprocess.run(
        [sys.executable, "-c", _NO_MODELS, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert "a model was built" in proc.stderr, proc.stderr[-2000:]
    return proc.stderr


def test_domains_and_their_teachers_are_logged_at_startup(world, tmp_path):
    """One unnamed --teacher-load and prompts of two domains: said at startup, with each
    domain's prompt counts, teacher, lambda and reference."""
    argv = _args(world, tmp_path, "--gopd-lambda", "1.25")
    argv[argv.index("--tensor-model-parallel-size") + 1] = "1"
    argv[argv.index("--prompt-data") + 1] = str(world["train2"])
    argv[argv.index("--eval-prompt-data") + 1] = str(world["eval2"])
    err = _cli_stderr(argv)
    teacher, student = world["teacher"], world["student"]
    assert "2 domains (code, math); one teacher (--teacher-load PATH) scores all of them" in err
    for domain in ("code", "math"):
        line = (
            f"  {domain}: 32 training / 8 evaluation prompts -> teacher {teacher}, lambda 1.25, "
            f"reference {student}"
        )
        assert line in err, err[-3000:]


def test_keep_only_some_domains(world, tmp_path):
    argv = _args(world, tmp_path, "--domains", "math")
    argv[argv.index("--prompt-data") + 1] = str(world["train2"])
    argv[argv.index("--eval-prompt-data") + 1] = str(world["eval2"])
    prompts, eval_prompts = _validate(argv)
    assert len(prompts) == 32 and {p.domain for p in prompts} == {"math"}
    assert len(eval_prompts) == 8 and {p.domain for p in eval_prompts} == {"math"}
    # prompt metadata survives (the answer of each kept line)
    assert all(p.metadata["answer"] for p in prompts)
    # a domain no prompt has: a typo, said at once
    argv[argv.index("--domains") + 1] = "math,maths"
    with pytest.raises(GopdError, match=r"--domains names 'maths', which no prompt of .*train2"):
        _validate(argv)
    # comma list and YAML list give the same config
    cfg = build_config(parse_args([*argv[:-2], "--domains", "code,math"]))
    assert cfg.data.domains == ("code", "math")
    yaml_file = tmp_path / "d.yaml"
    yaml_file.write_text("domains: [math, code]\n")
    assert build_config(parse_args(["--config", str(yaml_file), *argv[:-2]])).data.domains == (
        "math",
        "code",
    )


def test_the_rollout_client_sends_the_prompts_per_request_asked_for(world, tmp_path):
    from types import SimpleNamespace

    from megatron_gopd.trainer.preflight import load_tokenizer
    from megatron_gopd.trainer.rollout_side import RolloutSide

    for extra, want in [((), 1), (("--rollout-prompts-per-request", "3"), 3)]:
        cfg = build_config(parse_args(_args(world, tmp_path, *extra)))
        side = RolloutSide(cfg, load_tokenizer(cfg))
        side.servers = SimpleNamespace(
            urls=["http://h:1"], replace=None, generate_url=None, stop=lambda: None
        )
        assert side._client().config.prompts_per_request == want
        side.shutdown()
