"""Answer scoring on hand-worked cases."""
import pytest

from medvl_jax.evaluate import scoring


@pytest.mark.parametrize("qtype, pred, ref, want", [
    ("closed", "Yes.", "yes", 1.0),
    ("closed", "no", "yes", 0.0),
    ("closed", "normal", "no", 0.0),       # Not a substring match.
    ("multiple_choice", "B", "b", 1.0),
    ("multiple_choice", "B. left", "B", 0.0),
    ("counting", "2", "2", 1.0),
    ("counting", "12", "2", 0.0),
    ("progression", "Grown", "grown", 1.0),
    ("size", "14 mm", "15 mm", 1.0),        # Within 2 mm.
    ("size", "10 mm", "15 mm", 0.0),
    ("size", "none", "15 mm", 0.0),
    ("box", "[10, 10, 30, 30]", "[10, 10, 30, 30]", 1.0),
    ("box", "[10, 10, 30, 30]", "[20, 20, 40, 40]", 0.0),  # IoU = 100 / 700.
    ("box", "[10, 10, 30, 30]", "[12, 10, 32, 30]", 1.0),  # IoU = 360 / 440.
    ("box", "[10, 10]", "[10, 10, 30, 30]", 0.0),
])
def test_score(qtype, pred, ref, want):
    assert scoring.score(qtype, pred, ref) == want


def test_token_f1_hand_case():
    # pred words: left, lower, zone ; ref: left, upper, zone, nodule -> 2 common.
    p, r = 2 / 3, 2 / 4
    assert scoring.token_f1("The left lower zone.", "left upper zone nodule") == \
        pytest.approx(2 * p * r / (p + r))
    assert scoring.token_f1("", "") == 1.0 and scoring.token_f1("x", "") == 0.0


def test_box_iou_and_normalise():
    assert scoring.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert scoring.box_iou((0, 0, 0, 10), (0, 0, 0, 10)) == 0.0
    assert scoring.normalise("  The  Nodule is 2.5 cm. ") == "nodule is 2.5 cm"
