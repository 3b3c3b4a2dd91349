"""Parameter counts of the Table 1 rows, from initialising the real modules."""

import pytest

from qhnet import params

# DESIGN.md section 1: the counts this layout gives at 100 classes.
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
    'Eq. (6)': 5_610_596,
    'Eq. (7) no ws, x6': 12_971_044,
}


@pytest.fixture(scope='module')
def table():
    return {row: (ours, paper) for row, ours, paper in params.table()}


def test_every_row_is_counted(table):
    assert set(table) == set(params.TABLE1) == set(EXACT) | {'Eq. (5)'}


@pytest.mark.parametrize('row', sorted(EXACT))
def test_exact_counts(table, row):
    assert table[row][0] == EXACT[row]


def test_eq5_is_within_half_a_percent_of_the_paper(table):
    ours, paper = table['Eq. (5)']
    assert paper == 4.26e6
    assert abs(ours - paper) / paper < 0.005


def test_main_prints_the_table(capsys):
    params.main()
    out = capsys.readouterr().out
    assert '| Eq. (3) softball@ds    |    8,608,868 |   8.61M |' in out
    assert len(out.strip().splitlines()) == 2 + len(params.TABLE1)
