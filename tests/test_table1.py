"""experiments/table1.py: the dry run prints every command and runs nothing; two digits rows
train through the command line and aggregate into the table; a finished run is skipped; a
killed run resumes from its checkpoint instead of starting again."""

import json

import pytest

from experiments import table1
from qhnet import config


def read_results(out) -> dict:
    return json.loads(out.with_suffix('.json').read_text())


def test_dry_run_prints_every_command_and_runs_nothing(tmp_path, capsys):
    runs_dir = tmp_path / 'runs'
    assert table1.main(['--dry-run', '--seeds', '0', '1', '--runs_dir', str(runs_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f'{2 * len(config.ROWS)} runs, 0 done, {2 * len(config.ROWS)} to run')
    commands = lines[1:]
    assert len(commands) == 2 * len(config.ROWS)
    for row in config.ROWS:
        for seed in (0, 1):
            expected = (f'configs/{row}.py:fashion_mnist --workdir={runs_dir}/{row}/seed{seed} '
                        f'--config.seed={seed} --config.progress_bar=False '
                        f'--config.num_epochs={table1.REDUCED_EPOCHS}')
            assert sum(expected in command and '-m qhnet.main' in command
                       for command in commands) == 1
    assert not runs_dir.exists()


def test_breakdown_study_multiplies_the_recipe_learning_rate(tmp_path, capsys):
    assert table1.main(['--study=breakdown', '--dry-run', '--seeds', '0',
                        '--runs_dir', str(tmp_path)]) == 0
    commands = capsys.readouterr().out.splitlines()[1:]
    assert len(commands) == len(table1.BREAKDOWN) * len(table1.LR_FACTORS)
    base = config.row_config('eq3_softball', 'fashion_mnist').optimizer.base_lr
    identity = [c for c in commands if '--config.model.activation=identity' in c]
    assert [c.split('--config.optimizer.base_lr=')[1].split()[0] for c in identity] == [
        repr(base * factor) for factor in table1.LR_FACTORS]


def test_bad_rows_and_sets_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown row.*'eq8'.*valid rows"):
        table1.main(['--dry-run', '--rows', 'eq8', '--runs_dir', str(tmp_path)])
    with pytest.raises(SystemExit, match='--set takes KEY=VALUE'):
        table1.main(['--dry-run', '--set', 'seed', '--runs_dir', str(tmp_path)])


@pytest.mark.slow  # about 30 s: two rows trained through the command line
def test_two_digits_rows_train_and_aggregate(tmp_path, capsys):
    runs_dir, out = tmp_path / 'runs', tmp_path / 'results' / 'digits'
    args = ['--variant=digits', '--rows', 'eq3_softball', 'resnet50', '--seeds', '0',
            '--num_epochs', '2', '--runs_dir', str(runs_dir), '--out', str(out)]
    assert table1.main(args) == 0
    rows = read_results(out)['rows']
    assert [row['row'] for row in rows] == ['eq3_softball', 'resnet50']
    for row in rows:
        summary = json.loads((runs_dir / row['row'] / 'seed0' / 'summary.json').read_text())
        assert row['top1_seeds'] == [summary['test_top1']] and row['seeds'] == [0]
        assert row['top1_mean'] == summary['test_top1'] and row['top1_std'] is None
        assert row['params'] == summary['params'] > 0
        assert row['paper_top1'] == config.ROWS[row['row']].paper_top1
        assert row['rollbacks'] == 0 and row['wall_seconds'] > 0
        assert row['config'] == f'configs/{row["row"]}.py:digits'
    assert rows[0]['params'] != rows[1]['params']
    table = out.with_suffix('.md').read_text()
    assert '| eq3_softball |' in table and '| resnet50 |' in table
    capsys.readouterr()
    # Run again: both runs are finished, so nothing trains.
    assert table1.main(args) == 0
    assert '2 runs, 2 done, 0 to run' in capsys.readouterr().out
    state = json.loads((runs_dir / 'resnet50' / 'seed0' / 'harness.json').read_text())
    assert len(state['attempts']) == 1


def test_differences_are_read_against_the_spread_across_seeds():
    def row(name, top1, paper):
        return dict(row=name, top1_seeds=top1, top1_mean=sum(top1) / len(top1), paper_top1=paper)

    rows = [row('eq3_softball', [0.90, 0.91, 0.92], 83.66), row('apart', [0.93, 0.94, 0.95], 84.0),
            row('overlapping', [0.89, 0.915, 0.93], 82.0), row('one_seed', [0.99], 85.0),
            row('no_paper', [0.80, 0.81], None)]
    found = {c['row']: c for c in table1.against(rows, 'eq3_softball')}
    assert set(found) == {'apart', 'overlapping', 'no_paper'}
    assert found['apart']['beyond_spread'] and found['no_paper']['beyond_spread']
    assert not found['overlapping']['beyond_spread']
    assert abs(found['apart']['difference'] - 3.0) < 1e-9
    assert abs(found['overlapping']['paper_difference'] - (82.0 - 83.66)) < 1e-9
    assert found['no_paper']['paper_difference'] is None
    # Without a reference of 2 or more seeds there is nothing to compare against.
    assert table1.against(rows, 'one_seed') == [] and table1.against(rows, 'missing') == []


@pytest.mark.slow  # about 25 s: a run killed and resumed through the command line
def test_a_killed_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    runs_dir, out = tmp_path / 'runs', tmp_path / 'digits'
    args = ['--variant=digits', '--rows', 'eq3_softball', '--seeds', '0', '--num_epochs', '3',
            '--runs_dir', str(runs_dir), '--out', str(out)]
    steps_per_epoch = 1500 // 64  # digits: 1,500 training images, batch 64
    # The first attempt dies after the first epoch's checkpoint, as a killed process would.
    command = table1.command

    def crashing(run, variant):
        qhnet_main = command(run, variant)
        assert qhnet_main[1:3] == ['-m', 'qhnet.main']
        return [qhnet_main[0], '-m', 'tests.injection', f'--crash_after={steps_per_epoch + 5}',
                *qhnet_main[3:]]

    monkeypatch.setattr(table1, 'command', crashing)
    assert table1.main(args) == 1
    monkeypatch.undo()
    workdir = runs_dir / 'eq3_softball' / 'seed0'
    assert not (workdir / 'summary.json').exists()
    assert read_results(out)['rows'][0]['top1_seeds'] == []
    assert table1.main(args) == 0
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    resumes = [r['step'] for r in records if r.get('event') == 'resume']
    assert resumes == [steps_per_epoch]
    assert json.loads((workdir / 'summary.json').read_text())['steps'] == 3 * steps_per_epoch
    state = json.loads((workdir / 'harness.json').read_text())
    assert [a['returncode'] != 0 for a in state['attempts']] == [True, False]
    row = read_results(out)['rows'][0]
    assert len(row['top1_seeds']) == 1
    assert row['wall_seconds'] == pytest.approx(sum(a['wall_seconds'] for a in state['attempts']))
