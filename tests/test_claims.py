"""The report's conclusions as data (tables.yaml `claims`): each is the report's words, on columns that exist."""

from functools import cache

import pytest

from cxr14.params import PARAMS_FILE, apply, flatten, load
from experiments import tables

from .conftest import REPO

CATALOG = tables.load(REPO / "tables.yaml")
CLAIMS = [(table, claim) for table in CATALOG.values() for claim in table.claims]
TITLE = "NIH Chest X-ray Project Report"


@cache
def the_report() -> str | None:
    """The report, where tables.yaml's header says it is (../shared/seed), its whitespace collapsed."""
    for path in sorted((REPO.parent / "shared" / "seed").glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        if TITLE in text:
            return " ".join(text.split())
    return None


def claim_id(item):
    table, claim = item
    return f"{table.name}:{'-'.join(claim.columns)}:{claim.metric}"


def test_the_catalog_states_at_least_fifteen_of_the_reports_conclusions():
    assert len(CLAIMS) >= 15
    assert len({table.name for table, _ in CLAIMS}) >= 10  # drawn from the whole report, not one section


@pytest.mark.parametrize("item", CLAIMS, ids=[claim_id(c) for c in CLAIMS])
def test_every_quote_is_the_reports_words(item):
    report = the_report()
    if report is None:
        pytest.skip(f"the report is not in {REPO.parent / 'shared' / 'seed'}")
    _, claim = item
    assert " ".join(claim.quote.split()) in report


@pytest.mark.parametrize("item", CLAIMS, ids=[claim_id(c) for c in CLAIMS])
def test_every_claim_compares_columns_that_run_or_says_why(item):
    """A reference column (the CheXNet paper's figures) has no predictions to compare: the note says so."""
    _, claim = item
    for _, column in claim.sides:
        if column.reference:
            assert claim.note and "reference" in claim.note, claim.quote


def settings_of(table, column) -> dict:
    return flatten(apply(load(REPO / PARAMS_FILE), tables.settings(table, column)))


@pytest.mark.parametrize("item", [c for c in CLAIMS if not any(col.reference for _, col in c[1].sides)],
                         ids=claim_id)
def test_a_pair_that_differs_in_more_than_its_own_settings_says_so(item):
    """The columns' own `set` is what a table compares; any other setting that differs (one column being
    another table's run, say) makes the comparison about more than the claim's words: the note says so."""
    _, claim = item
    (table_a, a), (table_b, b) = claim.sides
    params_a, params_b = settings_of(table_a, a), settings_of(table_b, b)
    differ = {key for key in params_a.keys() | params_b.keys() if params_a.get(key) != params_b.get(key)}
    compared = set(a.set) | set(b.set)  # dotted keys: resample.targets.Hernia is part of resample.targets
    beyond = {key for key in differ if not any(f"{key}.".startswith(f"{k}.") or f"{k}.".startswith(f"{key}.")
                                               for k in compared)}
    if beyond:
        assert claim.note, f"{claim.quote!r}: {a.name} and {b.name} also differ in {sorted(beyond)}"


TEST_SET = ("data.", "filter.", "split.", "task.kind")  # what decides which images a column is tested on


@pytest.mark.parametrize("item", [c for c in CLAIMS if not any(col.reference for _, col in c[1].sides)],
                         ids=claim_id)
def test_a_pair_tested_on_different_images_says_so(item):
    """A paired comparison (DeLong, the paired bootstrap) needs both columns' predictions on the same images:
    where a setting that chooses the test images differs (the blacklist goes before the split), the note
    says the images differ."""
    _, claim = item
    (table_a, a), (table_b, b) = claim.sides
    params_a, params_b = settings_of(table_a, a), settings_of(table_b, b)
    differ = [key for key in params_a.keys() | params_b.keys()
              if key.startswith(TEST_SET) and params_a.get(key) != params_b.get(key)]
    if differ:
        assert claim.note and "images" in claim.note, f"{claim.quote!r}: test images differ by {sorted(differ)}"


def test_every_similar_claim_has_the_same_margin():
    """One standard for 'similar' across the report (the header of tables.yaml says why 0.01)."""
    margins = {claim.margin for _, claim in CLAIMS if claim.direction == "similar"}
    assert margins == {0.01}


def test_the_catalogs_directions_are_those_the_verdict_judges():
    from cxr14 import compare

    assert tables.CLAIM_DIRECTIONS == compare.DIRECTIONS


def test_a_claim_on_another_tables_column_resolves_to_it():
    table = CATALOG["binary_fibrosis"]
    claim = next(c for c in table.claims if "final_vs_chexnet/chexnet-paper" in c.columns)
    (own_table, own), (other_table, other) = claim.sides
    assert (own_table.name, own.name) == ("binary_fibrosis", "balanced")
    assert (other_table.name, other.name) == ("final_vs_chexnet", "chexnet-paper")


# ---------------------------------------------------------------- the loader refuses a bad claim

TABLE = """t:
  title: T
  task: multilabel14
  rows: [macro]
  set: {}
  why: {}
  columns:
    - {name: a, title: A}
    - {name: b, title: B}
  claims:
    - CLAIM
"""


def load_with(tmp_path, claim: str):
    (tmp_path / "tables.yaml").write_text(TABLE.replace("CLAIM", claim))
    return tables.load(tmp_path / "tables.yaml")


def test_a_valid_claim_is_read_with_its_columns(tmp_path):
    catalog = load_with(tmp_path, "{quote: words, columns: [a, b], metric: Hernia, direction: better}")
    claim = catalog["t"].claims[0]
    assert (claim.metric, claim.direction, claim.margin) == ("Hernia", "better", None)
    assert [column.name for _, column in claim.sides] == ["a", "b"]


@pytest.mark.parametrize("claim, message", [
    ("{quote: words, columns: [a, c], metric: macro, direction: better}",
     "table t, claim 1 .*columns: 'c' is not a column of t \\(a, b\\)"),
    ("{quote: words, columns: [a, other/b], metric: macro, direction: better}", "columns: 'other/b' is not a column"),
    ("{quote: words, columns: [a], metric: macro, direction: better}", "columns \\['a'\\]: expected two different"),
    ("{quote: words, columns: [a, a], metric: macro, direction: better}", "expected two different columns"),
    ("{quote: words, columns: [a, b], metric: No Finding, direction: better}",
     "metric 'No Finding': expected one of macro, micro, Atelectasis"),
    ("{quote: words, columns: [a, b], metric: macro, direction: higher}",
     "direction 'higher': expected one of better, worse, similar"),
    ("{quote: words, columns: [a, b], metric: macro, direction: similar}", "a 'similar' claim needs a margin"),
    ("{quote: words, columns: [a, b], metric: macro, direction: better, margin: 0.01}", "only a 'similar' claim has one"),
    ("{quote: words, columns: [a, b], metric: macro, direction: better, source: p3}", "unknown field 'source'"),
    ("{columns: [a, b], metric: macro, direction: better}", "table t, claim 1: no quote"),
    ("{quote: '  ', columns: [a, b], metric: macro, direction: better}", "quote '  ': expected the report's words"),
])
def test_a_bad_claim_is_refused_naming_table_claim_and_field(tmp_path, claim, message):
    with pytest.raises(ValueError, match=message):
        load_with(tmp_path, claim)
