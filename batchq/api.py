"""The Python API: ``run`` a frame (or rows, or a file) and get it back with its answers;
``arun`` in async code; ``run_job``, the CLI's ``batchq run`` as a function.

``run`` runs in a worker thread with its own event loop (``batchq.worker``), so it works
where a loop is running already (Jupyter), and the calling thread stays free for an
interrupt: it presses the run's stop switch, the run stops within its grace period with
every finished row saved, and ``batchq.errors.Interrupted`` (a KeyboardInterrupt) is
raised.

Without ``output=`` the state lives in the cache (``batchq.cache``), so the same call
resumes after a crash and a finished one is read back at once.
"""

from __future__ import annotations

import difflib
import re
import tempfile
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypedDict, Unpack

from batchq import memory
from batchq.cache import CallFolder, clear_staging
from batchq.config import Job, job_settings, load_job, simulated
from batchq.engine.runner import RunOptions, RunSummary
from batchq.engine.runner import run_job as run_engine
from batchq.engine.stop import StopSwitch
from batchq.errors import EmptyInput, InputError, UsageError
from batchq.events import Sink
from batchq.frames import Source, empty_results, from_frame, results_as, source_of, stage
from batchq.money.pricing import PriceTable, region_of
from batchq.worker import in_worker

__all__ = ["JobKeys", "RunKeys", "arun", "run", "run_job"]


class JobKeys(TypedDict, total=False):
    """The job file's keys, as keywords (``[request]``, ``[limits]``, ``[answer]``)."""

    name: str
    id_column: str
    provider: str
    base_url: str
    api_key_env: str
    model: str
    system: str
    template: str
    max_tokens: int
    temperature: float
    #: any other request field (top_p, seed, stop, tools, n, stream, response_format,
    #: enable_thinking, ...)
    params: dict[str, Any]
    #: send each distinct request body once; rows repeating one take its answer
    dedupe: bool
    qps: float
    qpm: float
    tpm: float
    concurrency: int
    max_attempts: int
    timeout_s: float
    #: no request starts that could take the run's spend past this (its models' currency)
    max_cost: float
    #: re-asks of a row whose answer is not valid (default 1)
    reasks: int
    pattern: str
    #: who sends: "local" (this process), or "ray" (workers on Ray: ``pip install
    #: 'batchq[ray]'``)
    engine: str
    #: ``engine="ray"``: the cluster's address (default: a local Ray for the call)
    ray_address: str
    #: ``engine="ray"``: sending workers
    workers: int
    #: the built-in simulator on a loopback port: no key, no network
    simulate: bool
    #: the live display (a bar in a terminal or a notebook; plain lines elsewhere)
    progress: bool
    restart: bool
    retry_errors: bool
    retry_invalid: bool
    keep_raw: bool


class RunKeys(JobKeys, total=False):
    """``run``'s keywords: the job's, and how the data becomes requests and comes back."""

    #: the column holding each row's messages (list of {role, content}); default "messages"
    messages: str
    #: the column holding each row's prompt (the user message); default "prompt"
    prompt: str
    #: labels (a list), a JSON Schema (a dict), or a pydantic model class
    answer: Any
    #: the output Parquet file: the CLI's behaviour exactly (its state folder beside it)
    output: str | Path
    #: keep the state in the cache (True), or in a temporary folder removed at the end
    cache: bool


class OverrideKeys(JobKeys, total=False):
    """``run_job``'s keywords: the job's keys and the CLI's switches."""

    input: str
    output: str
    labels: list[str]
    json_schema: dict[str, Any] | str
    keep_state: bool


_SWITCHES = ("restart", "retry_errors", "retry_invalid", "keep_raw", "keep_state")
_FRONT = ("simulate", "progress", "messages", "prompt", "answer", "output", "cache")


def run(data: Any, /, **keys: Unpack[RunKeys]) -> Any:
    """Send one request per row of ``data`` and give the rows back with their answers.

    ``data`` is a polars DataFrame or LazyFrame, a pandas DataFrame, a pyarrow Table or
    RecordBatchReader, a list of dicts, or a path to a ``.jsonl`` / ``.jsonl.gz`` /
    ``.parquet`` file. Every job-file key is a keyword (see ``RunKeys``). The rows come
    back in input order with the output columns (``status``, ``response``, the usage
    columns, ...) beside the input's own: a polars DataFrame for polars (a LazyFrame
    collected), pandas for pandas (its index kept), a pyarrow Table for pyarrow, polars
    for the rest.

    >>> import polars as pl, batchq
    >>> reviews = pl.DataFrame({"text": ["Great value.", "Broke in a week."]})
    >>> labeled = batchq.run(
    ...     reviews, model="qwen-plus", template="Review: {text}",
    ...     answer=["positive", "negative", "neutral"], simulate=True, progress=False,
    ... )
    >>> labeled.columns[:3]
    ['text', 'status', 'response']

    Run again, the same call resumes where it stopped (a crash, a kernel restart), and a
    finished one returns at once, sending nothing. Raises ``batchq.errors`` exceptions;
    a KeyboardInterrupt stops the run with its rows saved (``Interrupted``).
    """
    return in_worker(lambda stop: _Call.of(data, keys).run(stop))


async def arun(data: Any, /, **keys: Unpack[RunKeys]) -> Any:
    """``run`` for async code: ``labeled = await batchq.arun(df, model=..., ...)``."""
    return await _Call.of(data, keys).run(StopSwitch())


def run_job(job: str | Path | Job, /, **overrides: Unpack[OverrideKeys]) -> RunSummary:
    """``batchq run JOB.toml`` as a function: run (or resume) the job to its output file.

    Keywords override the job file's keys (``model="qwen-max"``, ``qps=5``) and set the
    CLI's switches (``simulate``, ``restart``, ``retry_errors``, ``retry_invalid``,
    ``keep_state``, ``keep_raw``, ``progress``).

    >>> summary = batchq.run_job("jobs/quickstart.toml", simulate=True)  # doctest: +SKIP
    """
    settings: dict[str, Any] = dict(overrides)
    _check_names(settings, OverrideKeys, "run_job")
    front = {k: settings.pop(k) for k in ("simulate", "progress") if k in settings}
    options = _options(settings)
    if isinstance(job, Job):
        base = job_settings(job)
        settings["params"] = {**base.pop("params"), **settings.get("params", {})}
        loaded = load_job(None, overrides={**base, **settings}, source="run_job")
    else:
        loaded = load_job(job, overrides=settings, source="run_job")

    async def go(stop: StopSwitch) -> RunSummary:
        with ExitStack() as stack:
            stack.enter_context(memory.system_pool())
            target, key = _endpoint(loaded, stack, simulate=bool(front.get("simulate")))
            sink = stack.enter_context(_display(target, on=front.get("progress", True)))
            return await run_engine(target, api_key=key, options=options, sink=sink, stop=stop)

    return in_worker(go)


@dataclass(frozen=True)
class _Call:
    """One ``run`` / ``arun`` call: its data, its job, and where it keeps its state."""

    data: Any
    source: Source
    job: Job
    options: RunOptions
    rename: dict[str, str]
    output: Path | None
    cache: bool
    simulate: bool
    progress: bool
    model_class: Any

    @classmethod
    def of(cls, data: Any, keys: RunKeys) -> _Call:
        """Check every keyword and the data's kind before anything is written."""
        settings: dict[str, Any] = dict(keys)
        _check_names(settings, RunKeys, "run")
        front = {k: settings.pop(k) for k in _FRONT if k in settings}
        options = _options(settings)
        answer, model_class = _answer(front.get("answer"))
        source = source_of(data)
        rename = {
            column: form
            for form in ("messages", "prompt")
            if (column := front.get(form)) is not None and column != form
        }
        if rename and source.kind == "path":
            raise UsageError(
                f"{next(iter(rename.values()))}= names a column of a frame; a "
                "file's column must be called messages or prompt (or give a "
                "template)"
            )
        placeholder = str(source.path or "data")
        job = load_job(
            None, overrides={"input": placeholder, **settings, **answer}, source="batchq.run"
        )
        output = Path(front["output"]) if front.get("output") is not None else None
        return cls(
            data,
            source,
            job,
            options,
            rename,
            output,
            cache=front.get("cache", True),
            simulate=bool(front.get("simulate")),
            progress=front.get("progress", True),
            model_class=model_class,
        )

    async def run(self, stop: StopSwitch) -> Any:
        with ExitStack() as stack:
            stack.enter_context(memory.system_pool())
            job, key = _endpoint(self.job, stack, simulate=self.simulate)
            job = self._placed(job, stack)
            sink = stack.enter_context(_display(job, on=self.progress))
            answers = job.answer is not None
            try:
                await run_engine(job, api_key=key, options=self.options, sink=sink, stop=stop)
            except EmptyInput:  # a library hands back an empty result, not an error
                frame = empty_results(
                    self.source, self.data, answers=answers, keep_raw=self.options.keep_raw
                )
                return _with_models(frame, self.model_class, self.source)
            except InputError as e:
                raise from_frame(e, self.source) from None
            frame = results_as(
                self.source,
                self.data,
                job.output,
                answers=answers,
                keep_raw=self.options.keep_raw,
                rename=self.rename,
                mapped=self._mapped(job, stack),
            )
            return _with_models(frame, self.model_class, self.source)

    def _placed(self, job: Job, stack: ExitStack) -> Job:
        """The job reading the data's file and writing its output: the cache's folder for
        the call, a temporary folder (``cache=False``), or ``output=`` with the data
        staged in a temporary folder."""
        if self.output is not None or not self.cache:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="batchq-")))
            data_file = self._staged(folder / f"input{self.source.suffix}")
            return replace(job, input=data_file, output=self.output or folder / "output.parquet")
        clear_staging()
        data_file = self._staged(CallFolder.staging(self.source.suffix))
        try:
            call = CallFolder.for_call(
                job, data_file, staged=self.source.staged, what=self.source.describe(self.data)
            )
        finally:
            if self.source.staged:
                data_file.unlink(missing_ok=True)
        stack.callback(call.drop_if_unused)
        return replace(job, input=call.input() or data_file, output=call.output)

    def _mapped(self, job: Job, stack: ExitStack) -> Path:
        """Where the frame handed back is mapped from: beside the output in the cache;
        else in a temporary folder (removed at the end: a mapped file stays readable
        until the frame lets it go)."""
        if self.cache and self.output is None:
            return CallFolder(job.output.parent).frame
        folder = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="batchq-", ignore_cleanup_errors=True)
        )
        return Path(folder) / "output.arrow"

    def _staged(self, path: Path) -> Path:
        """The data's file: the path given, or the data written to ``path``."""
        if self.source.path is not None:
            return self.source.path
        try:
            stage(self.source, self.data, path, rename=self.rename)
        except InputError as e:
            raise from_frame(e, self.source) from None
        return path


def _check_names(keys: dict[str, Any], allowed: type, where: str) -> None:
    """A TypeError-like UsageError for a keyword that is none of ``allowed``'s."""
    names = set(allowed.__required_keys__ | allowed.__optional_keys__)  # type: ignore[attr-defined]
    for key in keys:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f": did you mean {close[0]}?" if close else ""
            extra = "; other request fields go in params={...}" if not close else ""
            raise UsageError(f"{where}() got an unknown keyword {key!r}{hint}{extra}")


def _options(settings: dict[str, Any]) -> RunOptions:
    """The CLI's switches out of ``settings``."""
    switches: dict[str, Any] = {k: bool(settings.pop(k)) for k in _SWITCHES if k in settings}
    return RunOptions(**switches)


def _answer(answer: Any) -> tuple[dict[str, Any], Any]:
    """``answer=`` as [answer] keys, and the pydantic model class when it is one."""
    if answer is None:
        return {}, None
    if isinstance(answer, list | tuple):
        return {"labels": list(answer)}, None
    if isinstance(answer, dict):
        return {"json_schema": answer}, None
    if isinstance(answer, type) and hasattr(answer, "model_json_schema"):
        schema = answer.model_json_schema()  # a pydantic model class
        return {"json_schema": schema}, answer
    if isinstance(answer, re.Pattern):
        return {"pattern": answer.pattern}, None
    raise UsageError(
        f"answer={answer!r}: give labels (a list), a JSON Schema (a dict), a pydantic "
        "model class, or a compiled regular expression (or pattern='...')"
    )


def _endpoint(job: Job, stack: ExitStack, *, simulate: bool) -> tuple[Job, str | None]:
    """The job pointed at the simulator (started on ``stack``), or the key for it."""
    if not simulate:
        return job, job.request.api_key()
    from batchq.simulator import SimConfig, serve_in_thread

    sim = stack.enter_context(serve_in_thread(SimConfig(latency_ms=20)))
    return simulated(job, sim.base_url), None


def _display(job: Job, *, on: bool) -> AbstractContextManager[Sink]:
    from batchq.cli.progress import shown  # rich, only when shown

    return shown(PriceTable.load(None), region_of(job.request.provider), on=on)


def _with_models(frame: Any, model_class: Any, source: Source) -> Any:
    """With a pydantic model as ``answer``, its column as a struct of the model's fields."""
    if model_class is None:
        return frame
    from batchq.frames import answers_as_structs

    return answers_as_structs(frame, model_class, source)
