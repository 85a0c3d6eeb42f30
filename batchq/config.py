"""Job settings: frozen dataclasses, loaded from a TOML job file with flag overrides.

A job is the input and output paths, the request settings and the limits. Every key of
the job file can be overridden by a flag (see ``batchq run --help``); a job can be given
by flags alone. Provider presets fill in the base URL and the key's variable name.
"""

from __future__ import annotations

import json
import math
import os
import string
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from batchq.answer import KEYS as ANSWER_KEYS
from batchq.answer import AnswerSpec, load_answer
from batchq.errors import UsageError
from batchq.qwen import serves_model_studio

__all__ = [
    "PRESETS",
    "AnswerSpec",
    "Job",
    "Limits",
    "Preset",
    "RequestSettings",
    "job_settings",
    "load_job",
]


@dataclass(frozen=True)
class Preset:
    base_url: str | None
    api_key_env: str | None


# Base URLs: Alibaba Cloud Model Studio, "OpenAI compatible - Chat"
# (alibabacloud.com/help/en/model-studio/compatibility-of-openai-with-dashscope,
# last updated 2026-03-18): Singapore dashscope-intl, China (Beijing) dashscope.
PRESETS: dict[str, Preset] = {
    "dashscope-intl": Preset(
        "https://dashscope-intl.aliyuncs.com/compatible-mode/v1", "DASHSCOPE_API_KEY"
    ),
    "dashscope": Preset("https://dashscope.aliyuncs.com/compatible-mode/v1", "DASHSCOPE_API_KEY"),
    "openai": Preset("https://api.openai.com/v1", "OPENAI_API_KEY"),
    "custom": Preset(None, None),
}


@dataclass(frozen=True)
class RequestSettings:
    """What each request is made of. ``params`` holds every other body field, passed through."""

    provider: str = "dashscope-intl"
    base_url: str | None = None
    api_key_env: str | None = None
    model: str | None = None
    system: str | None = None
    template: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    #: Send each distinct request body once; rows repeating one take its answer (never sent)
    dedupe: bool = False
    #: Whether the endpoint is the built-in simulator (``--simulate``), not the provider's.
    simulated: bool = False

    @property
    def url(self) -> str:
        """The base URL: the one set, else the preset's."""
        url = self.base_url or PRESETS[self.provider].base_url
        if not url:
            raise UsageError(
                "provider 'custom' needs a base_url: set it in [request] or --base-url"
            )
        url = url.rstrip("/")
        if url.endswith("/chat/completions"):
            raise UsageError(
                f"the base_url {url} ends with /chat/completions, which batchq adds: give "
                f"{url.removesuffix('/chat/completions')} instead"
            )
        return url

    @property
    def model_studio(self) -> bool:
        """Whether the endpoint is Model Studio, so that its rules apply (``batchq.qwen``)."""
        return serves_model_studio(self.provider, self.base_url or PRESETS[self.provider].base_url)

    @property
    def key_env(self) -> str | None:
        """The name of the environment variable holding the key, or None for no key."""
        return self.api_key_env or PRESETS[self.provider].api_key_env

    def api_key(self) -> str | None:
        """Read the key from the environment. Raises UsageError when it is named but unset."""
        name = self.key_env
        if name is None:
            return None
        key = os.environ.get(name)
        if not key:
            raise UsageError(
                f"the API key variable {name} is not set: export {name}=... "
                "(or name another variable with api_key_env / --api-key-env, "
                "or rehearse with --simulate)"
            )
        return key


@dataclass(frozen=True)
class Limits:
    """Client-side limits. None means no limit of that kind."""

    qps: float | None = None
    qpm: float | None = None
    tpm: float | None = None
    concurrency: int = 64
    max_attempts: int = 8
    timeout_s: float = 120.0
    #: stop before the run's spend could pass this (``--max-cost``; money/budget.py)
    max_cost: float | None = None


@dataclass(frozen=True)
class Job:
    name: str
    input: Path
    output: Path
    request: RequestSettings
    limits: Limits
    id_column: str | None = None
    #: what a valid answer is (``[answer]``); None: every answer is taken as it is
    answer: AnswerSpec | None = None
    #: who sends: this process ("local"), or workers on Ray ("ray", SPEC "Scale-out on Ray")
    engine: str = "local"
    #: ``engine = "ray"``: the cluster (None: a local Ray, started and stopped by the run)
    ray_address: str | None = None
    #: ``engine = "ray"``: sending workers (None: one per CPU Ray offers, at most 8)
    workers: int | None = None


_TOP_KEYS = {"name", "input", "output", "id_column", "engine", "ray_address", "workers"}
ENGINES = ("local", "ray")
_REQUEST_KEYS = {f.name for f in fields(RequestSettings)} - {"params", "simulated"}
_LIMIT_KEYS = {f.name for f in fields(Limits)}
_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "input": (str,),
    "output": (str,),
    "id_column": (str,),
    "engine": (str,),
    "ray_address": (str,),
    "workers": (int,),
    "provider": (str,),
    "base_url": (str,),
    "api_key_env": (str,),
    "model": (str,),
    "system": (str,),
    "template": (str,),
    "max_tokens": (int,),
    "temperature": (int, float),
    "dedupe": (bool,),
    "qps": (int, float),
    "qpm": (int, float),
    "tpm": (int, float),
    "concurrency": (int,),
    "max_attempts": (int,),
    "timeout_s": (int, float),
    "max_cost": (int, float),
}


def load_job(
    path: str | Path | None, *, overrides: dict[str, Any] | None = None, source: str = "flags"
) -> Job:
    """Read a job file (or none) and apply flag overrides, checking every key and type.

    ``overrides`` uses the job file's key names (``timeout_s``, not ``timeout``; the
    ``[answer]`` keys as they are) plus ``params`` for extra request fields. Relative
    paths are taken from the current folder. ``source`` names where the settings came from
    when there is no file (in messages: "flags", or the Python call).

    >>> load_job(None, overrides={"input": "in.jsonl", "model": "qwen-plus"}).output
    PosixPath('in.batchq.parquet')
    """
    if path is not None and str(path).endswith(".json"):  # an export's manifest.json
        exported, extra = _exported_job(Path(path)), dict(overrides or {})
        params = {**exported.pop("params", {}), **extra.pop("params", {})}
        return load_job(None, overrides={**exported, **extra, "params": params}, source=source)
    raw = _read_toml(Path(path)) if path is not None else {}
    source = str(path) if path else source
    flat, params, answer = _flatten(raw, source=source)
    for key, value in (overrides or {}).items():
        if key == "params":
            params.update(value)
        elif key in ANSWER_KEYS:
            if value is not None:
                answer[key] = value
        elif value is not None:
            flat[key] = value
    for key, value in flat.items():
        _check_type(key, value, source=source)
    job = _build(flat, params, default_name=Path(path).stem if path else None)
    return replace(job, answer=load_answer(answer, source=source))


def job_settings(job: Job) -> dict[str, Any]:
    """The job as ``load_job``'s overrides: what ``export-batch`` records in its
    manifest.json, so that a job given by flags alone can be named by that file."""
    r, limits = job.request, job.limits
    settings: dict[str, Any] = {
        "name": job.name,
        "input": str(job.input.absolute()),
        "output": str(job.output.absolute()),
        "id_column": job.id_column,
    }
    settings |= {k: getattr(r, k) for k in _REQUEST_KEYS}
    settings |= {k: getattr(limits, k) for k in _LIMIT_KEYS}
    if (a := job.answer) is not None:
        labels = list(a.labels) if a.labels is not None else None
        settings |= {
            "labels": labels,
            "json_schema": a.json_schema,
            "pattern": a.pattern,
            "reasks": a.reasks,
        }
    return {k: v for k, v in settings.items() if v is not None} | {"params": dict(r.params)}


def _exported_job(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"job file {path} does not exist: check the path") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not an export's manifest.json: {e}") from None
    job = manifest.get("job") if isinstance(manifest, dict) else None
    if not isinstance(job, dict):
        raise UsageError(
            f"{path} holds no job: give the job file, or the manifest.json that export-batch wrote"
        )
    return job


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"job file {path} does not exist: check the path") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"job file {path} is not valid TOML: {e}") from None


def _flatten(
    raw: dict[str, Any], *, source: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The job file's top-level and [request] / [limits] keys in one dict, the request
    fields passed through, and the [answer] table."""
    flat: dict[str, Any] = {}
    params: dict[str, Any] = {}
    answer: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "request" and isinstance(value, dict):
            for k, v in value.items():
                (flat if k in _REQUEST_KEYS else params)[k] = v
        elif key == "limits" and isinstance(value, dict):
            for k, v in value.items():
                if k not in _LIMIT_KEYS:
                    known = ", ".join(sorted(_LIMIT_KEYS))
                    raise UsageError(f"{source}: unknown key [limits].{k}; known: {known}")
                flat[k] = v
        elif key == "answer" and isinstance(value, dict):
            answer.update(value)
        elif key in _TOP_KEYS:
            flat[key] = value
        else:
            known = ", ".join(sorted(_TOP_KEYS | {"[request]", "[limits]", "[answer]"}))
            raise UsageError(f"{source}: unknown key {key!r}; known: {known}")
    return flat, params, answer


def _check_type(key: str, value: Any, *, source: str) -> None:
    types = _TYPES.get(key)
    if types is None:
        return
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        want = " or ".join(t.__name__ for t in types)
        raise UsageError(f"{source}: {key} must be {want}, not {value!r}")
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and ((value <= 0 and key != "temperature") or math.isnan(value))
    ):
        raise UsageError(f"{source}: {key} must be positive, not {value!r}")


def _build(flat: dict[str, Any], params: dict[str, Any], *, default_name: str | None) -> Job:
    if "input" not in flat:
        raise UsageError("no input: set input in the job file or pass --input FILE")
    provider = flat.get("provider") or ("custom" if flat.get("base_url") else "dashscope-intl")
    if provider not in PRESETS:
        raise UsageError(f"unknown provider {provider!r}; choose one of {', '.join(PRESETS)}")
    if isinstance(params.get("tools"), str):
        params["tools"] = _read_tools(Path(params["tools"]))
    if isinstance(flat.get("template"), str):
        _check_template(flat["template"])
    request = RequestSettings(
        provider=provider,
        **{k: flat[k] for k in _REQUEST_KEYS - {"provider"} if k in flat},
        params=params,
    )
    limits = Limits(**{k: flat[k] for k in _LIMIT_KEYS if k in flat})
    if limits.max_attempts < 1:
        raise UsageError("max_attempts must be at least 1")
    input_path = Path(flat["input"])
    output = Path(flat.get("output") or _default_output(input_path))
    name = flat.get("name") or default_name or input_path.stem
    engine = flat.get("engine", "local")
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    return Job(
        name,
        input_path,
        output,
        request,
        limits,
        flat.get("id_column"),
        engine=engine,
        ray_address=flat.get("ray_address"),
        workers=flat.get("workers"),
    )


def _check_template(template: str) -> None:
    """A template's fields are column names, nothing more: ``{text.upper}`` would send a
    method's repr, ``{text!r}`` Python's quoting."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)]
    except ValueError as e:
        raise UsageError(
            f"the template {template!r} is not valid: {e}; write a literal brace as {{{{ or }}}}"
        ) from None
    for name, spec, conversion in fields:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            field = "{" + name + (f"!{conversion}" if conversion else "")
            field += (f":{spec}" if spec else "") + "}"
            raise UsageError(
                f"the template field {field} is not a column name: a field is a column's "
                "name alone, such as {text} (write a literal brace as {{ or }})"
            )


def _read_tools(path: Path) -> list[Any]:
    """``tools = "tools.json"``: the tool definitions from a JSON file (a list)."""
    try:
        tools = json.loads(path.read_text("utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read the tools file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UsageError(
            f"the tools file {path} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}"
        ) from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise UsageError(f"the tools file {path} must hold a JSON list of tool objects")
    return tools


def _default_output(input_path: Path) -> Path:
    stem = input_path.name.split(".")[0]
    return input_path.with_name(f"{stem}.batchq.parquet")


def simulated(job: Job, base_url: str) -> Job:
    """The same job pointed at the built-in simulator at ``base_url`` (``--simulate``).
    The provider stays, so a rehearsal follows its rules and is priced as the real run
    would be; ``simulated`` keeps its answers apart from the real ones. A job bound for
    Model Studio is served under ``/compatible-mode/v1``, so that its rules (the Qwen
    rules, the Batch API's limits) hold for the rehearsal too."""
    if job.request.model_studio and base_url.endswith("/v1"):
        base_url = base_url.removesuffix("/v1") + "/compatible-mode/v1"
    request = replace(job.request, base_url=base_url, api_key_env=None, simulated=True)
    return replace(job, request=request)
