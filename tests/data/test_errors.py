"""The skip counter and the guard, on hand-counted cases."""
import pytest

from medvl_jax.data.errors import (MIN_READS_FOR_CEILING, DataError, SkipCounter,
                                   TooManyBadRecords, guarded)


def _bad(record, rng):
    if record.get("bad"):
        raise DataError("file not found", where=record["image"],
                        reason="missing")
    return record


def test_distinct_records_and_the_ceiling():
    skips = SkipCounter(0.1, echo=False)
    fn = guarded(_bad, skips, first_stage=True)
    recs = [{"where": f"d.jsonl:{i + 1}", "image": f"{i}.png", "bad": i in (3, 7)}
            for i in range(20)]
    # 10 epochs of 20 records, 2 bad: 20 bad reads in 200 (10% — not more than the ceiling).
    for _ in range(10):
        out = [fn(r, None) for r in recs]
    assert out[3] is None and out[4] is recs[4]
    assert skips.total == 2 and skips.counts == {"missing": 2}
    assert skips.state()["reads"] == 200 and skips.state()["bad_reads"] == 20
    assert skips.examples[0] == "d.jsonl:4: 3.png: file not found"  # The line is added.
    # The next bad read makes it 21 of 204 > 10%.
    for r in recs[:3]:
        fn(r, None)
    with pytest.raises(TooManyBadRecords, match=r"21 of 204 records.*d\.jsonl:4"):
        fn(recs[3], None)


def test_no_ceiling_before_enough_reads_and_state_round_trip():
    skips = SkipCounter(0.0, echo=False)
    fn = guarded(_bad, skips, first_stage=True)
    rec = {"id": "s1", "image": "x.png", "bad": True}
    for _ in range(MIN_READS_FOR_CEILING - 1):
        assert fn(rec, None) is None
    again = SkipCounter(0.0, echo=False)
    again.restore(skips.state())
    assert again.total == 1 and again.state() == skips.state()
    with pytest.raises(TooManyBadRecords):
        guarded(_bad, again, first_stage=True)(rec, None)


def test_without_skipping_the_error_names_the_record():
    fn = guarded(_bad, None)
    with pytest.raises(DataError, match=r"^d\.jsonl:9: 8\.png: file not found$") as e:
        fn({"meta": {"where": "d.jsonl:9"}, "image": "8.png", "bad": True}, None)
    assert e.value.reason == "missing"
    assert fn(None, None) is None  # Dropped upstream: passes through.
