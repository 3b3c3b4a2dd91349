"""The README as a newcomer reads it: short, current (no commit hashes of ours), every results
file it links present, and its Python example runnable as written."""

import os
import re
import subprocess

from qhnet import training
from tests.test_training import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        return f.read()


def test_the_readme_is_short():
    assert len(readme().splitlines()) <= 260


def test_no_commit_hash_of_this_repository_in_the_readme_or_the_design():
    found = []
    for name in ('README.md', 'docs/design.md'):
        with open(os.path.join(ROOT, name), encoding='utf-8') as f:
            for candidate in set(re.findall(r'\b[0-9a-f]{7,40}\b', f.read())):
                known = subprocess.run(['git', 'rev-parse', '--verify', '--quiet',
                                        f'{candidate}^{{commit}}'], cwd=ROOT,
                                       capture_output=True, check=False)
                if known.returncode == 0:
                    found.append((name, candidate))
    assert found == []


def test_every_file_the_readme_links_exists():
    paths = set(re.findall(r'\(((?:docs|benchmarks|experiments|notebooks|configs)/[^)#\s]+)\)',
                           readme()))
    paths |= set(re.findall(r'`((?:benchmarks/results|experiments)/[^`\s<>]+\.(?:md|png|json))`',
                            readme()))
    assert len(paths) >= 10
    assert sorted(path for path in paths if not os.path.exists(os.path.join(ROOT, path))) == []


def test_the_python_example_runs_as_written(tmp_path):
    """The README's symmetry example, on a small run in place of the Quick start's."""
    workdir = str(tmp_path / 'run')
    training.train_and_evaluate(tiny_config(), workdir)
    (example,) = re.findall(r'```python\n(.*?)```', readme(), re.S)
    assert "'workdir/eq3_softball_fmnist'" in example
    namespace = {}
    exec(example.replace("'workdir/eq3_softball_fmnist'", repr(workdir)), namespace)  # pylint: disable=exec-used
    assert namespace['report']['invariant'] is True
