"""The report's conclusions as data (tables.yaml `claims`): each is the report's words, on columns that exist."""

import pytest

from experiments import tables

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
