"""The price table: tiers, cache discount, thinking output, Batch API, lookups, overrides."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pytest

from batchq.errors import UsageError
from batchq.money.pricing import PriceTable, RowPricer, region_of, row_costs


@pytest.fixture
def table() -> PriceTable:
    return PriceTable.builtin()


def test_the_builtin_table_is_dated_and_sourced(table: PriceTable) -> None:
    assert "alibabacloud.com/help/en/model-studio" in table.source
    assert "checked 2026-11-27" in table.source


def test_qwen_plus_singapore_by_hand(table: PriceTable) -> None:
    price = table.lookup("qwen-plus", "intl")
    assert price is not None
    assert price.currency == "USD"
    # 1,000 prompt tokens at $0.4/M + 200 completion at $1.2/M
    assert price.cost(1000, 200) == pytest.approx(0.0004 + 0.00024)
    # 400 of the prompt tokens hit the implicit cache: billed at 20 % of the input price
    assert price.cost(1000, 200, cached=400) == pytest.approx(
        600 * 0.4e-6 + 400 * 0.08e-6 + 0.00024
    )
    # thinking mode: the completion at $4/M
    assert price.cost(1000, 200, thinking=True) == pytest.approx(0.0004 + 0.0008)
    # through the Batch API: half
    assert price.cost(1000, 200, batch=True) == pytest.approx((0.0004 + 0.00024) / 2)


def test_tiers_follow_each_requests_prompt_tokens(table: PriceTable) -> None:
    price = table.lookup("qwen3-max", "intl")
    assert price is not None
    assert price.cost(32768, 0) == pytest.approx(32768 * 1.2e-6)
    assert price.cost(32769, 0) == pytest.approx(32769 * 2.4e-6)
    assert price.cost(200_000, 10) == pytest.approx(200_000 * 3e-6 + 10 * 15e-6)


def test_regions_are_priced_apart(table: PriceTable) -> None:
    cn = table.lookup("qwen-flash", "cn")
    assert cn is not None
    assert cn.currency == "CNY"
    assert cn.cost(1000, 1000) == pytest.approx(1000 * 0.15e-6 + 1000 * 1.5e-6)
    assert region_of("dashscope") == "cn"
    assert region_of("dashscope-intl") == "intl"
    assert region_of("openai") == "any"


def test_snapshots_and_latest_find_their_model_and_unknown_models_none(
    table: PriceTable,
) -> None:
    assert table.lookup("qwen-plus-2025-07-28", "intl") == table.lookup("qwen-plus", "intl")
    assert table.lookup("qwen-plus-latest", "intl") == table.lookup("qwen-plus", "intl")
    assert table.lookup("gpt-4o-mini", "intl") is None
    assert table.lookup("qwen-plus", "any") is None  # a self-hosted "qwen-plus" is not billed
    assert table.lookup(None, "intl") is None


def test_a_price_file_overrides_and_extends(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        '[models."qwen-plus".intl]\ncurrency = "USD"\ntiers = [{ input = 1, output = 2 }]\n'
        '[models."local".any]\ncurrency = "USD"\ntiers = [{ input = 0, output = 0 }]\n'
    )
    table = PriceTable.load(path)
    plus = table.lookup("qwen-plus", "intl")
    assert plus is not None
    assert plus.cost(1_000_000, 1_000_000) == pytest.approx(3.0)
    local = table.lookup("local", "cn")
    assert local is not None
    assert local.cost(10, 10) == 0
    assert str(path) in table.source


def test_a_price_files_entry_wins_with_or_without_a_region(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        '[models."qwen-plus".any]\ntiers = [{ input = 10, output = 0 }]\n'
        '[models."my-llama"]\ntiers = [{ input = 1, output = 1 }]\n'  # no region: all
    )
    table = PriceTable.load(path)
    for region in ("intl", "cn"):
        plus = table.lookup("qwen-plus-2025-07-28", region)
        assert plus is not None  # the file's "any" beats the built-in intl / cn entry
        assert plus.cost(1_000_000, 0) == pytest.approx(10.0)
        llama = table.lookup("my-llama", region)
        assert llama is not None
        assert llama.cost(1_000_000, 1_000_000) == pytest.approx(2.0)
    assert table.lookup("qwen-max", "intl") == PriceTable.builtin().lookup("qwen-max", "intl")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models.x.mars]\ntiers = [{ input = 1, output = 1 }]", "region must be one of"),
        ("[models.x.intl]\ncurrency = 'USD'", "each entry needs tiers"),
        ("[models.x.intl]\ntiers = []", "the list of tiers is empty"),
        ("[models.x.intl]\ntiers = [{ input = 'a', output = 1 }]", "each entry needs tiers"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_a_bad_price_file_says_what_and_where(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message) as info:
        PriceTable.load(path)
    assert str(path) in str(info.value)


def test_the_cost_column_prices_each_row_as_a_bill_by_hand(table: PriceTable) -> None:
    """Tiers by each row's prompt, cache hits at 20 %, thinking output, the Batch API's
    half, nothing for an error, null for an unpriced model."""
    rows = [  # model, prompt, cached, completion, reasoning, via, status -> USD by hand
        ("qwen-plus", 1000, 0, 100, None, "live", "ok", (1000 * 0.4 + 100 * 1.2) / 1e6),
        (
            "qwen-plus",
            300_000,
            100,
            50,
            None,
            "live",
            "ok",
            (299_900 * 1.2 + 100 * 1.2 * 0.2 + 50 * 3.6) / 1e6,
        ),
        ("qwen-plus", 100, 0, 1000, 800, "live", "ok", (100 * 0.4 + 1000 * 4.0) / 1e6),
        ("qwen-plus", 1000, 0, 100, None, "batch", "ok", (1000 * 0.4 + 100 * 1.2) / 2e6),
        ("qwen-plus", None, None, None, None, "live", "error", 0.0),
        ("mystery-model", 10, 0, 10, None, "live", "ok", None),
    ]
    results = pa.table(
        {
            "model": [r[0] for r in rows],
            "prompt_tokens": pa.array([r[1] for r in rows], pa.int64()),
            "cached_tokens": pa.array([r[2] for r in rows], pa.int64()),
            "completion_tokens": pa.array([r[3] for r in rows], pa.int64()),
            "reasoning_tokens": pa.array([r[4] for r in rows], pa.int64()),
            "reasoning": pa.array(["thought" if r[4] else None for r in rows], pa.string()),
            "via": [r[5] for r in rows],
            "status": [r[6] for r in rows],
        }
    )
    pricer = RowPricer(table, "intl")
    costs = pricer(results).to_pylist()
    assert costs[:-1] == pytest.approx([r[7] for r in rows[:-1]])
    assert costs[-1] is None
    assert pricer.describe()["currencies"] == ["USD"]
    assert "alibabacloud.com" in pricer.describe()["prices"]


def test_an_explicit_caches_creation_and_hits_are_priced_at_their_shares(
    table: PriceTable,
) -> None:
    """Model Studio's context-cache page: creation at 125 % of the input price, explicit
    hits at 10 %, implicit hits at 20 % (qwen-plus intl: $0.4 per 1M input)."""
    results = pa.table(
        {
            "model": ["qwen-plus"] * 3,
            "prompt_tokens": pa.array([2000, 2000, 2000], pa.int64()),
            "cached_tokens": pa.array([0, 1500, 1500], pa.int64()),
            "cache_creation_tokens": pa.array([1500, 0, None], pa.int64()),
            "completion_tokens": pa.array([0, 0, 0], pa.int64()),
            "reasoning_tokens": pa.array([None] * 3, pa.int64()),
            "reasoning": pa.array([None] * 3, pa.string()),
            "via": ["live"] * 3,
            "status": ["ok"] * 3,
        }
    )
    costs = RowPricer(table, "intl")(results).to_pylist()
    assert costs == pytest.approx(
        [
            (500 * 0.4 + 1500 * 0.4 * 1.25) / 1e6,  # written to the explicit cache
            (500 * 0.4 + 1500 * 0.4 * 0.1) / 1e6,  # an explicit hit
            (500 * 0.4 + 1500 * 0.4 * 0.2) / 1e6,  # an implicit hit
        ]
    )
    price = table.lookup("qwen-plus", "intl")
    assert price is not None
    assert price.cost(2000, 0, cached=1500, created=0) == pytest.approx(costs[1])


@pytest.mark.parametrize("region", ["intl", "cn"])
def test_every_model_of_the_list_has_a_price_or_says_why_not(
    table: PriceTable, region: str
) -> None:
    """The coverage of Model Studio's OpenAI-compatible list, held over the list itself:
    no name of it is merely "unpriced" (as an unknown model is)."""
    text = resources.files("batchq").joinpath("money/data/prices.toml").read_text("utf-8")
    catalog = tomllib.loads(text)["catalog"]
    names = [*catalog["commercial"], *catalog["open_source"]]
    assert len(names) == len(set(names)) >= 70
    unexplained = [
        n
        for n in names
        if table.lookup(n, region) is None and table.why_unpriced(n, region) == "unpriced"
    ]
    assert unexplained == []
    assert table.why_unpriced("my-llama", region) == "unpriced"


def test_a_model_without_a_price_says_why_and_a_price_file_gives_it_one(
    table: PriceTable, tmp_path: Path
) -> None:
    assert table.lookup("qwen3-8b", "intl") is None
    assert table.unpriced_name("qwen3-8b", "intl") == (
        "qwen3-8b (no published price, checked 2026-12-06)"
    )
    # an old snapshot is not priced as its base model, whose price has been cut since
    assert table.lookup("qwen-max-2024-09-19", "cn") is None
    assert table.lookup("qwen-plus-2025-07-28", "cn") is table.lookup("qwen-plus", "cn")
    prices = tmp_path / "prices.toml"
    prices.write_text(
        '[models."qwen3-8b"]\ntiers = [{ input = 0.1, output = 0.4 }]\n\n'
        '[models."my-llama".cn]\nnot_sold = "2026-12-06"\n'
    )
    mine = PriceTable.load(prices)
    assert mine.lookup("qwen3-8b", "intl") is not None  # no region: every region
    assert mine.lookup("qwen3-8b", "cn") is not None
    assert mine.unpriced_name("my-llama", "cn") == "my-llama (not sold in cn, checked 2026-12-06)"
    results = pa.table(
        {
            "model": ["qwen3-14b", "qwen3-8b"],
            "prompt_tokens": pa.array([10, 10], pa.int64()),
            "cached_tokens": pa.array([None, None], pa.int64()),
            "completion_tokens": pa.array([5, 5], pa.int64()),
            "reasoning_tokens": pa.array([None, None], pa.int64()),
            "reasoning": pa.array([None, None], pa.string()),
            "via": ["live"] * 2,
            "status": ["ok"] * 2,
        }
    )
    unpriced: set[str] = set()
    costs = row_costs(results, mine, "intl", unpriced).column("cost").to_pylist()
    assert costs[0] is None  # never $0
    assert costs[1] == pytest.approx((10 * 0.1 + 5 * 0.4) / 1e6)
    assert unpriced == {"qwen3-14b (no published price, checked 2026-12-06)"}
