"""Money and counts where spend features meet: every combination of the ways a row is
sent (live, ``--via batch``), shared (``--dedupe``), checked (labels with re-asks), asked
(``n``) and capped (``--max-cost``), held to the simulator's ledger of what it billed.

The invariants (SPEC "Spend control"):

(a) spend never exceeds ``max_cost``: requests in flight, batches, ``n`` choices, re-asks,
    and prompts with more tokens a character than the estimate (the simulator bills a
    token a character, as a CJK tokenizer does; the estimate assumes one per three);
(b) the ``cost`` column sums to what the ledger billed;
(c) ``batchq cost`` and ``status`` say the same, with no flag repeated;
(d) the summary's requests are the ledger's, and its tokens are what was billed.

A spend feature added later adds a parameter here, not a test of its own.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchq.money.pricing import PriceTable

ENV = {"DASHSCOPE_API_KEY": "sk-simulated"}
#: $1,000 per 1M tokens in and out: a token costs $0.001; the Batch API half of that.
PRICES = '[models."qwen-plus"]\ntiers = [{ input = 1000.0, output = 1000.0 }]\n'
ROWS = 24
#: A cap that stops every capped cell part of the way (eight distinct rows through the
#: Batch API cost $0.13), yet lets a request at its worst case ($0.06) through.
CAP = 0.10


def billed(ledger: dict[str, Any], prices: Path) -> float:
    """What the ledger's lines cost at ``prices``: the Batch API's at its share."""
    price = PriceTable.load(prices).lookup("qwen-plus", "any")
    assert price is not None
    return sum(
        price.cost(line["prompt_tokens"], line["completion_tokens"], batch=line["via"] == "batch")
        for line in ledger["lines"]
    )


def ledger_of(sim: Any) -> dict[str, Any]:
    return sim.simulator.ledger.report()  # type: ignore[no-any-return]


def inputs(dedupe: bool, answer: bool) -> list[dict[str, Any]]:
    # With --dedupe, eight distinct requests three times each. With labels, half the rows
    # echo a label (a valid answer), half do not (re-asked, then invalid).
    distinct = ROWS // 3 if dedupe else ROWS
    texts = [
        ("positive" if answer and i % 2 else f"review {i} of many words") for i in range(distinct)
    ]
    return [{"id": f"r{i}", "text": texts[i % distinct]} for i in range(ROWS)]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("capped", [False, True], ids=["uncapped", "capped"])
@pytest.mark.parametrize("n", [1, 3], ids=["n=1", "n=3"])
@pytest.mark.parametrize("answer", [False, True], ids=["plain", "labels"])
@pytest.mark.parametrize("dedupe", [False, True], ids=["each", "dedupe"])
@pytest.mark.parametrize("via", ["live", "batch"])
def test_money_and_counts_hold_in_every_combination(
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    cli: Any,
    tmp_path: Path,
    via: str,
    dedupe: bool,
    answer: bool,
    n: int,
    capped: bool,
) -> None:
    check_cell(simulator, write_jsonl, cli, tmp_path, via, dedupe, answer, n, capped)


def check_cell(
    simulator: Callable[..., Any],
    write_jsonl: Callable[..., Path],
    cli: Any,
    tmp_path: Path,
    via: str,
    dedupe: bool,
    answer: bool,
    n: int,
    capped: bool,
    extra: tuple[str, ...] = (),
) -> None:
    """One cell of the matrix (``extra``: more flags, such as another engine's)."""
    sim = simulator(tokens_per_char=1.0, batch_seconds=0.1, latency_ms=20)
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    out = tmp_path / "out.parquet"
    flags = [
        "run",
        "--input",
        write_jsonl(inputs(dedupe, answer)),
        "--output",
        out,
        "--base-url",
        sim.base_url,
        "--provider",
        "custom",
        "--model",
        "qwen-plus",
        "--template",
        "{text}",
        "--max-tokens",
        "8",
        "--concurrency",
        "4",
        "--prices",
        prices,
        "--param",
        f"n={n}",
    ]
    flags += ["--via", "batch", "--poll-s", "0.05"] if via == "batch" else []
    flags += ["--dedupe"] if dedupe else []
    flags += ["--labels", "positive,negative,neutral", "--reasks", "1"] if answer else []
    flags += ["--max-cost", str(CAP)] if capped else []
    flags += list(extra)
    rows = inputs(dedupe, answer)
    result = cli(*flags, env=ENV)
    ledger = ledger_of(sim)
    spent = billed(ledger, prices)
    lines = ledger["lines"]
    live = sum(1 for line in lines if line["via"] == "live")
    batch = sum(1 for line in lines if line["via"] == "batch")
    # (a) never above the cap, whatever came back how
    if capped:
        assert result.exit_code == 3, result.output
        assert spent <= CAP + 1e-9, (spent, result.output)
        said = re.search(r"\$([\d.]+) billed so far", result.output)
        assert said is not None, result.output
        assert float(said[1]) == pytest.approx(spent, abs=5e-5)  # what the server billed
        assert "rerun with a higher --max-cost" in result.output
    else:
        assert result.exit_code == 0, result.output
    # (c) status and cost from the results, no --prices given: the bill
    status = json.loads(cli("status", out, "--json").output)
    assert sum(status["costs"].values()) == pytest.approx(spent, rel=1e-9, abs=1e-12)
    report = json.loads(cli("cost", out, "--json").output)
    assert sum(report["totals"].values()) == pytest.approx(spent, rel=1e-9, abs=1e-12)
    if capped:
        return
    # (b) the cost column is the bill; copies cost nothing
    frame = pl.read_parquet(out)
    assert frame["cost"].sum() == pytest.approx(spent, rel=1e-9)
    if dedupe:
        copies = frame.filter(pl.col("via") == "dedupe")
        assert copies.height == ROWS - len({row["text"] for row in rows})
        assert set(copies["cost"]) == {0.0}
    # (d) the summary counts what was sent and billed
    sent = re.search(r"([\d,]+) requests sent this run", result.output)
    assert sent is not None, result.output
    assert int(sent[1].replace(",", "")) == live, result.output
    submitted = re.search(r"([\d,]+) lines submitted to the Batch API", result.output)
    assert (int(submitted[1].replace(",", "")) if submitted else 0) == batch, result.output
    tokens = re.search(
        r"tokens billed: ([\d,]+) prompt \(\d+ cached\) \+ ([\d,]+) completion", result.output
    )
    assert tokens is not None, result.output
    prompt, completion = (int(t.replace(",", "")) for t in tokens.groups())
    assert prompt == sum(line["prompt_tokens"] for line in lines)
    assert completion == sum(line["completion_tokens"] for line in lines)


def test_a_kill_and_resumes_under_rising_caps_keep_every_invariant(
    simulator: Callable[..., Any], write_jsonl: Callable[..., Path], cli: Any, tmp_path: Path
) -> None:
    # Every spend feature at once, with faults, killed mid-run, then resumed twice: with a
    # higher cap (which stops again), then with none.
    sim = simulator(
        tokens_per_char=1.0, latency_ms=60, fail_503=0.05, fail_drop=0.03, fail_429=0.05, seed=6
    )
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    rows = [
        {"id": f"r{i}", "text": "positive" if i % 4 == 1 else f"review {i % 90} at length"}
        for i in range(240)
    ]
    out = tmp_path / "out.parquet"
    job = [
        "--input",
        str(write_jsonl(rows)),
        "--output",
        str(out),
        "--base-url",
        sim.base_url,
        "--provider",
        "custom",
        "--model",
        "qwen-plus",
        "--template",
        "{text}",
        "--max-tokens",
        "8",
        "--concurrency",
        "8",
        "--prices",
        str(prices),
        "--param",
        "n=3",
        "--dedupe",
        "--labels",
        "positive,negative,neutral",
        "--reasks",
        "1",
        "--timeout",
        "2",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "batchq", "run", *job, "--max-cost", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shards = out.with_name("out.parquet.batchq") / "shards"
    deadline = time.monotonic() + 30
    while not any(shards.glob("[0-9]*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert billed(ledger_of(sim), prices) <= 2 + 1e-9
    capped = cli("run", *job, "--max-cost", "3", env=ENV)
    assert capped.exit_code == 3, capped.output
    assert billed(ledger_of(sim), prices) <= 3 + 1e-9
    finished = cli("run", *job, env=ENV)
    assert finished.exit_code == 0, finished.output
    spent = billed(ledger_of(sim), prices)
    column = pl.read_parquet(out)["cost"].sum()
    # Paid twice at most: what was in flight at the kill (8 requests of at most $0.06 each)
    assert column <= spent + 1e-9
    assert spent - column <= 8 * 0.06
    status = json.loads(cli("status", out, "--json").output)
    assert sum(status["costs"].values()) == pytest.approx(column)
