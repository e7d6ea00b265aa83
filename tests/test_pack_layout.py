"""study/pack_layout.py: programs per trial, the layouts tried, how many trials stay resident."""

from __future__ import annotations

import pytest

from study.pack_layout import (
    KNOWN_GPUS,
    MAX_HIDDEN,
    ROW_CHOICES,
    WIDEST_ROWS,
    Layout,
    choose_layout,
    layouts,
    resident_pack,
    widest_rows,
)

H100_SMS = KNOWN_GPUS["h100"].sms


def test_programs_are_unit_blocks_times_row_blocks() -> None:
    assert Layout(16, 16).programs(batch=100, hidden=100) == 7 * 7  # one pixel-MNIST trial today
    assert Layout(128, 16).programs(batch=100, hidden=100) == 7
    assert Layout(64, 16).programs(batch=100, hidden=128) == 8 * 2
    assert Layout(32, 32).programs(batch=19, hidden=10) == 1


def test_layouts_stop_at_the_padded_batch_and_at_max_rows() -> None:
    assert [layout.rows for layout in layouts(100)] == [16, 32, 64, 128]
    assert [layout.rows for layout in layouts(19)] == [16, 32]  # 64 rows would hold 19 too
    assert [layout.rows for layout in layouts(16)] == [16]
    assert [layout.rows for layout in layouts(1000)] == list(ROW_CHOICES)
    assert [layout.rows for layout in layouts(100, max_rows=32)] == [16, 32]
    assert all(layout.units == 32 for layout in layouts(100, units=32))


def test_a_single_trial_keeps_the_narrow_layout() -> None:
    # 49 programs at 16 rows fit an H100: the single-trial kernels as they were.
    assert choose_layout(1, 100, 100, H100_SMS) == Layout(16, 16)
    assert choose_layout(2, 100, 100, H100_SMS) == Layout(16, 16)  # 98 <= 132
    assert choose_layout(3, 100, 100, H100_SMS) == Layout(32, 16)  # 147 > 132; 84 fit


def test_a_full_pack_takes_the_widest_layout() -> None:
    assert choose_layout(18, 100, 100, H100_SMS) == Layout(128, 16)
    assert choose_layout(16, 100, 128, H100_SMS) == Layout(128, 16)
    assert choose_layout(19, 100, 100, H100_SMS) is None  # 133 programs: the row kernels
    assert choose_layout(18, 100, 100, H100_SMS, max_rows=32) is None
    assert choose_layout(1, 100, MAX_HIDDEN + 1, H100_SMS) is None


@pytest.mark.parametrize(
    ("batch", "hidden", "sms", "trials"),
    [
        (100, 100, 132, 18),  # pixel MNIST: 7 programs a trial at 128 rows
        (100, 128, 132, 16),  # copying: 8
        (100, 100, 108, 15),  # an A100
        (100, 256, 132, 1),  # too wide for the split kernels: the row kernels, one trial
        (19, 16, 132, 132),  # one program a trial
    ],
)
def test_resident_pack(batch: int, hidden: int, sms: int, trials: int) -> None:
    assert resident_pack(batch, hidden, sms) == trials
    # As many as stay resident, and no more.
    if hidden <= MAX_HIDDEN:
        assert choose_layout(trials, batch, hidden, sms) is not None
        assert choose_layout(trials + 1, batch, hidden, sms) is None


def test_resident_pack_at_the_widest_rows_of_full_fp32() -> None:
    rows = widest_rows("fp32")
    assert rows == widest_rows("ieee") == 32
    assert resident_pack(100, 100, 132, max_rows=rows) == 132 // (7 * 4)
    assert resident_pack(100, 100, 132, max_rows=rows) < resident_pack(100, 100, 132)


def test_every_precision_and_exchange_has_a_widest_layout() -> None:
    for precision in ("ieee", "tf32", "tf32x3"):
        for sync in ("barrier", "tagged"):
            assert WIDEST_ROWS[(precision, sync)] in ROW_CHOICES
    assert widest_rows("tf32") == ROW_CHOICES[-1]
    with pytest.raises(KeyError):
        widest_rows("bf16")
