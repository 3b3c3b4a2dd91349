"""The package as a newcomer meets it: small modules, and dependencies declared as ranges with
the tested versions pinned apart, in the constraints file that setup.sh and CI install from."""

import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_MODULE_LINES = 420  # "about 400"
CONSTRAINTS = 'constraints.txt'


def requirement_name(requirement: str) -> str:
    return re.split(r'[<>=!~\[; ]', requirement, maxsplit=1)[0].lower().replace('_', '-')


def test_every_module_is_small():
    sizes = {}
    for folder, _, names in os.walk(os.path.join(ROOT, 'qhnet')):
        for name in names:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                with open(path, encoding='utf-8') as f:
                    sizes[os.path.relpath(path, ROOT)] = sum(1 for _ in f)
    assert len(sizes) > 30
    assert {path: lines for path, lines in sizes.items() if lines > MAX_MODULE_LINES} == {}


def test_dependencies_are_ranges_and_the_tested_versions_are_pinned_apart():
    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
        project = tomllib.load(f)['project']
    declared = project['dependencies'] + [requirement for extra in
                                          project['optional-dependencies'].values()
                                          for requirement in extra]
    for requirement in declared:
        version = requirement.split(';')[0]  # an environment marker may follow
        assert '==' not in version and '>=' in version, requirement
    with open(os.path.join(ROOT, CONSTRAINTS), encoding='utf-8') as f:
        pins = dict(line.split('==') for line in f.read().split('\n')
                    if line.strip() and not line.startswith('#'))
    pinned = {requirement_name(name) for name in pins}
    assert {requirement_name(r) for r in declared} <= pinned
    with open(os.path.join(ROOT, 'setup.sh'), encoding='utf-8') as f:
        assert f'--constraint {CONSTRAINTS}' in f.read()


def test_every_lower_bound_is_the_version_ci_tests_as_the_lowest():
    """The ranges' lower bounds and constraints-lowest.txt (installed by .ci/lowest.sh) say
    the same thing."""
    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
        project = tomllib.load(f)['project']
    bounds = {requirement_name(r): r.split('>=')[1] for r in project['dependencies']}
    with open(os.path.join(ROOT, 'constraints-lowest.txt'), encoding='utf-8') as f:
        lowest = {requirement_name(name): version for name, version in (
            line.strip().split('==') for line in f if line.strip() and not line.startswith('#'))}
    assert {name: lowest.get(name) for name in bounds} == bounds
    with open(os.path.join(ROOT, '.ci', 'lowest.sh'), encoding='utf-8') as f:
        assert '--constraint constraints-lowest.txt' in f.read()
