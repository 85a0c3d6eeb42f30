"""What the commands share: the job flags, reading a job from a file and flags, the price
file option, money and cost text, and failing with a BatchqError's message and exit code."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import orjson

from batchq.cli.progress import money
from batchq.cli.streams import write_or_silence
from batchq.config import Job, load_job
from batchq.errors import BatchqError
from batchq.money.report import CostReport

__all__ = ["PRICE_FILE", "cost_text", "fail", "job_from", "job_options"]


def _param(ctx: click.Context, option: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=JSON, e.g. --param top_p=0.8")
        try:
            params[key] = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            # Not guessed as a string: {type:json_object} would be sent as one.
            hint = "check its quotes and brackets"
            if raw and raw[0] not in '{["':
                hint = f"a string needs JSON quotes: --param '{key}=\"{raw}\"'"
            raise click.BadParameter(
                f"{item!r}: {raw!r} is not JSON ({e.msg} at character {e.pos + 1}); {hint}"
            ) from None
    return params


PRICE_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)

JOB_FLAGS = [
    ("--name", str, "the job's name (default: the job file's)"),
    ("--input", str, "input file: .jsonl, .jsonl.gz or .parquet"),
    ("--output", str, "output Parquet file"),
    ("--id-column", str, "the input column that identifies a row"),
    ("--provider", click.Choice(["dashscope-intl", "dashscope", "openai", "custom"]), "preset"),
    ("--base-url", str, "the endpoint, overriding the preset's"),
    ("--api-key-env", str, "the environment variable holding the API key"),
    ("--model", str, "model name, e.g. qwen-plus"),
    ("--system", str, "system prompt, prepended to every row's messages"),
    ("--template", str, "user message as a str.format template over the row's columns"),
    ("--max-tokens", int, "max_tokens of each request"),
    ("--temperature", float, "sampling temperature"),
    ("--qps", float, "requests per second, at most"),
    ("--qpm", float, "requests per minute, at most"),
    ("--tpm", float, "tokens per minute, at most"),
    ("--concurrency", int, "requests in flight, at most"),
    ("--max-attempts", int, "attempts per row before it is recorded as an error"),
    ("--timeout", float, "seconds before an attempt is given up and retried"),
    ("--max-cost", float, "no request starts that could take the run's spend past this"),
    ("--labels", str, "a valid answer is one of these labels (comma-separated)"),
    ("--json-schema", str, "a valid answer is JSON valid under this JSON Schema file"),
    ("--pattern", str, "a valid answer matches this regular expression as a whole"),
    ("--reasks", int, "times a row is asked again when its answer is not valid (default 1)"),
]

#: The parameter names of the job's flags (``job_options``), as click passes them.
JOB_KEYS = frozenset(
    [flag.removeprefix("--").replace("-", "_") for flag, _, _ in JOB_FLAGS] + ["dedupe", "params"]
)


def job_options(f: Any) -> Any:
    f = click.option(
        "--dedupe",
        is_flag=True,
        default=None,
        help="send each distinct request once; repeats take its answer",
    )(f)
    for flag, type_, help_ in reversed(JOB_FLAGS):
        f = click.option(flag, type=type_, default=None, help=help_)(f)
    return click.option(
        "--param",
        "params",
        multiple=True,
        callback=_param,
        metavar="KEY=JSON",
        help="any other request field, e.g. --param top_p=0.8 --param seed=7",
    )(f)


def job_from(job_file: str | None, flags: dict[str, Any]) -> Job:
    overrides = {k: v for k, v in flags.items() if v is not None}
    if "timeout" in overrides:
        overrides["timeout_s"] = overrides.pop("timeout")
    return load_job(job_file, overrides=overrides)


def cost_text(report: CostReport) -> str:
    parts = [money(v, c) for c, v in sorted(report.totals.items())]
    if report.unpriced:
        parts.append(f"unpriced models: {', '.join(report.unpriced)} (give --prices)")
    return " + ".join(parts) or "nothing"


def fail(error: BatchqError) -> NoReturn:
    say(f"error: {error}", err=True)
    sys.exit(error.exit_code)


def say(text: str, *, err: bool = False) -> None:
    """``click.echo``, but a reader that went away (``| head``) silences the stream instead
    of turning the command's exit code into 1."""
    write_or_silence(sys.stderr if err else sys.stdout, text + "\n")
