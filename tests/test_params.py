"""Parameter counts of the Table 1 rows and the released QLNet, from initialising the real
modules."""

import pytest

from qhnet import config, params

# The counts this layout gives at 100 classes (docs/design.md, 'Parameter counts').
EXACT = {
    'ResNet50': 23_712_932,
    'MobileNet_v3_large': 4_330_132,
    'Eq. (3) relu@all': 8_608_868,
    'Eq. (3) hardtanh@ds': 8_608_868,
    'Eq. (3) hardball@ds': 8_608_868,
    'Eq. (3) softball@ds': 8_608_868,
    'Eq. (3) no ws': 8_728_100,
    'Eq. (3) no ws, x6': 12_971_044,
    'Eq. (4)': 5_696_612,
    'Eq. (5)': 4_267_108,
    'Eq. (6)': 5_610_596,
    # With BN_c on the coefficient branch, as in the authors' Eq. (7)-type block.
    'Eq. (7) no ws, x6': 13_010_980,
}


@pytest.fixture(scope='module')
def table():
    return {row: (ours, paper) for row, ours, paper in params.table()}


def test_every_row_is_counted(table):
    assert set(table) == {row.title for row in config.ROWS.values()} == set(EXACT)


@pytest.mark.parametrize('row', sorted(EXACT))
def test_exact_counts(table, row):
    assert table[row][0] == EXACT[row]


@pytest.mark.parametrize('row', sorted(EXACT))
def test_counts_match_the_paper_to_its_rounding(table, row):
    """Table 1 rounds to three significant figures; Eq. (5) is 0.17% above its 4.26M."""
    ours, paper = table[row]
    assert abs(ours - paper) / paper < (0.005 if row == 'Eq. (5)' else 0.0025)


def test_main_prints_the_table(capsys):
    params.main()
    out = capsys.readouterr().out
    assert '| Eq. (3) softball@ds    |    8,608,868 |   8.61M |' in out
    assert '| Eq. (7) no ws, x6      |   13,010,980 |  13.00M |' in out
    assert '| QLNet-50 (released)    |    1000 |    9,993,640 |    9,993,640 |' in out
    assert len(out.strip().splitlines()) == 2 + len(config.ROWS) + 3 + len(params.PYTORCH_PARAMS)


def test_qlnet_counts_equal_the_authors_pytorch_model():
    """PYTORCH_PARAMS is PyTorch's count of the authors' model (recounted by test_convert)."""
    table = params.released_table()
    assert [(classes, ours) for _, classes, ours, _ in table] == [(100, 9_531_940),
                                                                 (1000, 9_993_640)]
    assert all(ours == theirs for _, _, ours, theirs in table)
