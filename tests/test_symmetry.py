"""The symmetry toolkit (`qhnet.symmetry`): fold, group_spec, sample, act, inverse, verify, unfold.

Every Table 1 architecture x activation x placement runs on real digits through the
small-input variant; the full 224x224 Eq. (3) softball@ds model on random images is
marked slow. Variables come from `random_variables` (non-trivial BN: a fresh model's BN_o
scale of zero would make every block invisible and these tests vacuous).

Tolerances: the fold matches the Flax model to 1e-5 (float32) and 1e-10 (float64);
admitted elements change the logits by at most 1e-9 in float64, and in float32 by at most
100 * eps(float32) * sqrt(width) * kappa (`invariance_tolerance`), with width the widest
stream (32 here, 512 at 224x224) and kappa = `condition(element)`: the largest cond(T),
where permutations times diagonals count 1. Negative controls must change the logits by
more than 1e-3.

Float64 fold checks run the Flax model with dtype float64 and compare the head's output.
"""

import ast
import json
import pathlib
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qhnet import config, models
from qhnet import symmetry
from qhnet.symmetry import groups
from qhnet.symmetry.action import MAX_CONDITION
from qhnet.symmetry.testing import random_variables
from tests import authors_qlnet
from tests.conftest import resize_images

EPS32 = float(np.finfo(np.float32).eps)
ACTIVATIONS = ('relu', 'hardtanh', 'hardball', 'softball', 'identity')
PLACEMENTS = ('ds', 'all')
# Stage 1 without a carrier, a downsampling carrier alone (stage 2), and a last block that
# carries the activation without downsampling (stage 3), as in the ResNet50 layout.
SMALL = dict(stem='small', widths=(8, 16, 32), depths=(2, 1, 2), num_classes=10)
ARCHITECTURE_FIELDS = ('equation', 'weight_sharing', 'multiplier')


def table1_architectures() -> dict[str, dict]:
    """The distinct QHNet block architectures of Table 1: equation, weight sharing, multiplier."""
    found = {}
    for row in config.ROWS:
        model_config = config.row_config(row).model
        if model_config.name == 'qhnet':
            fields = {key: model_config[key] for key in ARCHITECTURE_FIELDS}
            name = f'eq{fields["equation"]}' + ('' if fields['weight_sharing'] else '_nows') + \
                (f'_x{fields["multiplier"]}' if fields['multiplier'] != 4 else '')
            found[name] = fields
    return found


ARCHITECTURES = {**table1_architectures(), 'qlnet': {'name': 'qlnet'}}  # and QLNet's block


@pytest.fixture(scope='module')
def images(digits) -> np.ndarray:
    """16 real digits, upsampled to 16x16: stages at 16, 8 and 4 pixels."""
    return np.asarray(resize_images(digits[0][:16], 16, 1))


def small_model(architecture: str, activation: str = 'softball', placement: str = 'ds',
                **overrides):
    model_config = config.model_config()
    model_config.update({**ARCHITECTURES[architecture], 'activation': activation,
                         'placement': placement, **SMALL, **overrides})
    return models.build(model_config)


def flax_logits(model, variables, images, dtype=np.float32) -> np.ndarray:
    """The Flax model in eval mode; in float64, the head's output before the float32 cast."""
    if dtype == np.float32:
        return np.asarray(model.apply(variables, images, train=False))
    variables = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), variables)
    _, state = model.clone(dtype=jnp.float64).apply(
        variables, jnp.asarray(images, jnp.float64), train=False, capture_intermediates=True,
        mutable=['intermediates'])
    return np.asarray(state['intermediates']['head']['__call__'][0])


def float32_tolerance(spec, kappa: float) -> float:
    """100 eps(float32) sqrt(width) kappa, stated here rather than read from the toolkit."""
    return 100 * EPS32 * np.sqrt(max(s.width for s in spec.streams)) * kappa


def relative(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def make_case(architecture, activation='softball', placement='ds', image_shape=(16, 16, 16, 1),
              **overrides):
    model = small_model(architecture, activation, placement, **overrides)
    variables = random_variables(model, image_shape, seed=0)
    return model, variables, symmetry.group_spec(model)


# The claim: every architecture, activation and placement.

def fold_cases():
    """Every architecture x activation x placement; QLNet's beyond hardball@ds (its own row)
    and identity@all (GL(n) on every stream) are slow."""
    for architecture in sorted(ARCHITECTURES):
        for activation in ACTIVATIONS:
            for placement in PLACEMENTS:
                fast = architecture != 'qlnet' or (activation, placement) in (
                    ('hardball', 'ds'), ('identity', 'all'))
                yield pytest.param(architecture, activation, placement,
                                   marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize('architecture,activation,placement', fold_cases())
def test_fold_and_invariance(images, architecture, activation, placement):
    model, variables, spec = make_case(architecture, activation, placement)
    form32 = symmetry.fold(spec, variables)
    logits32 = symmetry.apply(spec, form32, images)
    assert relative(logits32, flax_logits(model, variables, images)) <= 1e-5
    element = symmetry.sample(spec, jax.random.key(1), cond=10.0)
    with jax.enable_x64(True):
        form64 = symmetry.fold(spec, variables, np.float64)
        logits64 = symmetry.apply(spec, form64, images)
        assert relative(logits64, flax_logits(model, variables, images, np.float64)) <= 1e-10
        result = symmetry.verify(spec, form64, element, images)
    assert result['error'] <= 1e-9 and result['invariant'], result
    result = symmetry.verify(spec, form32, element, images)
    assert result['error'] <= float32_tolerance(spec, result['kappa']), result
    assert result['invariant']


def test_strided_small_stem(images):
    """The Fashion-MNIST variant's 3x3/2 stem: the fold reads its stride, and the group acts."""
    model, variables, spec = make_case('eq3', stem='small_stride2')
    assert spec.structure.stem_stride == (2, 2)
    form = symmetry.fold(spec, variables)
    assert relative(symmetry.apply(spec, form, images), flax_logits(model, variables, images)) <= 1e-5
    result = symmetry.verify(spec, form, symmetry.sample(spec, jax.random.key(1), cond=10.0), images)
    assert result['invariant'] and result['error'] <= float32_tolerance(spec, result['kappa']), result


@pytest.mark.parametrize('activation', ['identity', 'relu'])
def test_float32_error_is_bounded_by_condition_number(images, activation):
    """cond(T) from 1 to 1000. GL streams (identity): kappa = cond(T); scaled permutations (relu)
    round nothing beyond eps: kappa = 1."""
    _, variables, spec = make_case('eq3', activation)
    form = symmetry.fold(spec, variables)
    for cond in (1.0, 10.0, 100.0, 1000.0):
        element = symmetry.sample(spec, jax.random.key(2), cond=cond)
        kappa = symmetry.condition(element)
        assert kappa == pytest.approx(cond if activation == 'identity' else 1.0)
        result = symmetry.verify(spec, form, element, images)
        assert result['error'] <= float32_tolerance(spec, kappa) and result['invariant'], result


def test_mixing_model_and_hidden_symmetries_alone(images):
    """A model with trained (non-identity) mixing maps; streams alone and hidden channels alone."""
    _, variables, spec = make_case('eq5', 'softball', 'all', mixing=True)
    assert not np.allclose(variables['params']['stage1_block1']['mix_in']['kernel'], np.eye(8))
    element = symmetry.sample(spec, jax.random.key(3), cond=10.0)
    with jax.enable_x64(True):
        form = symmetry.fold(spec, variables, np.float64)
        for part in ({'streams': element['streams']}, {'hidden': element['hidden']}):
            assert symmetry.verify(spec, form, part, images)['error'] <= 1e-9


@pytest.mark.slow
def test_full_size_eq3_softball():
    """The paper's main model at 224x224, on 2 random images."""
    model = models.build(config.row_config('eq3_softball').model)
    images = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    variables = random_variables(model, images.shape)
    spec = symmetry.group_spec(model)
    form32 = symmetry.fold(spec, variables)
    logits32 = symmetry.apply(spec, form32, images)
    assert relative(logits32, flax_logits(model, variables, images)) <= 1e-5
    element = symmetry.sample(spec, jax.random.key(0), cond=10.0)
    with jax.enable_x64(True):
        result = symmetry.verify(spec, symmetry.fold(spec, variables, np.float64), element, images)
    assert result['error'] <= 1e-9, result
    result = symmetry.verify(spec, form32, element, images)
    assert result['error'] <= float32_tolerance(spec, result['kappa']), result


def check_qlnet_symmetries(model, variables, images):
    """QLNet: each stream's element alone, and the hidden permutations with their factor
    scalings, keep the logits to 1e-9 (float64); GL(n) on any stream, and a scaling of one
    factor without the other, change them."""
    spec = symmetry.group_spec(model)
    element = symmetry.sample(spec, jax.random.key(5), cond=10.0)
    with jax.enable_x64(True):
        form = symmetry.fold(spec, variables, np.float64)
        for name, t in element['streams'].items():
            result = symmetry.verify(spec, form, {'streams': {name: t}}, images)
            assert result['error'] <= 1e-9 and result['invariant'], (name, result)
            outside = symmetry.sample(spec, jax.random.key(6), cond=10.0, group={name: 'GL'},
                                      hidden=False, force=True)['streams'][name]
            result = symmetry.verify(spec, form, {'streams': {name: outside}}, images, force=True)
            assert result['error'] > 1e-3 and not result['invariant'], (name, result)
        assert symmetry.verify(spec, form, {'hidden': element['hidden']}, images)['error'] <= 1e-9
        one_factor = {layer: dict(arrays) for layer, arrays in form.items()}
        one_factor['stage2_block1']['coef'] = 2 * form['stage2_block1']['coef']
        one_factor['stage2_block1']['coef_bias'] = 2 * form['stage2_block1']['coef_bias']
        assert relative(symmetry.apply(spec, one_factor, images),
                        symmetry.apply(spec, form, images)) > 1e-3


def test_qlnet_streams_and_hidden_symmetries(images):
    model, variables, _ = make_case('qlnet', 'hardball', 'ds')
    check_qlnet_symmetries(model, variables, images)


@pytest.mark.slow
def test_full_size_qlnet50():
    """The released QLNet's architecture at 224x224, on 2 real photos."""
    model = models.build(config.row_config('qlnet50', 'imagenet1k').model)
    images = authors_qlnet.photos()[:2]
    variables = random_variables(model, images.shape)
    spec = symmetry.group_spec(model)
    assert [(s.name, s.width, s.group) for s in spec.streams] == [
        ('stem', 64, 'scaled_permutation'), ('stage2_block1', 128, 'O'),
        ('stage3_block1', 256, 'O'), ('stage4_block1', 512, 'O'), ('stage4_block3', 512, 'O')]
    form32 = symmetry.fold(spec, variables)
    assert relative(symmetry.apply(spec, form32, images), flax_logits(model, variables, images)) \
        <= 1e-5
    check_qlnet_symmetries(model, variables, images)


# The spec, derived from the model.

def test_streams_follow_the_activations():
    spec = symmetry.group_spec(small_model('eq3', 'softball', 'ds'))
    # Stage 1 lies on the stem's ReLU stream; the last block's activation starts the last.
    assert [(s.name, s.width, s.group, s.blocks) for s in spec.streams] == [
        ('stem', 8, 'scaled_permutation', ('stage1_block1', 'stage1_block2')),
        ('stage2_block1', 16, 'O', ('stage2_block1',)),
        ('stage3_block1', 32, 'O', ('stage3_block1',)),
        ('stage3_block2', 32, 'O', ('stage3_block2',))]
    relu_all = symmetry.group_spec(small_model('eq3', 'relu', 'all'))
    blocks = [b.name for b in relu_all.structure.blocks]
    assert [s.name for s in relu_all.streams] == ['stem'] + blocks
    assert {s.group for s in relu_all.streams} == {'scaled_permutation'}
    # With activation='identity' the carriers of the (identity) activation still start streams.
    identity = symmetry.group_spec(small_model('eq3', 'identity', 'ds'))
    assert [(s.name, s.group) for s in identity.streams] == [
        ('stem', 'scaled_permutation'), ('stage2_block1', 'GL'), ('stage3_block1', 'GL'),
        ('stage3_block2', 'GL')]


def test_tied_streams_keep_identity_shortcuts():
    """Tied across identity shortcuts, streams merge and their group is the intersection."""
    tied = symmetry.group_spec(small_model('eq3', 'softball', 'ds'), tie_identity_shortcuts=True)
    assert [(s.name, s.group, s.blocks) for s in tied.streams] == [
        ('stem', 'scaled_permutation', ('stage1_block1', 'stage1_block2')),
        ('stage2_block1', 'O', ('stage2_block1',)),
        ('stage3_block1', 'O', ('stage3_block1', 'stage3_block2'))]
    relu = symmetry.group_spec(small_model('eq3', 'relu', 'all'), tie_identity_shortcuts=True)
    assert [(s.name, s.group) for s in relu.streams] == [
        ('stem', 'scaled_permutation'), ('stage2_block1', 'scaled_permutation'),
        ('stage3_block1', 'scaled_permutation')]
    assert groups.meet('O', 'scaled_permutation') == 'permutation'
    assert groups.meet('GL', 'signed_permutation') == 'signed_permutation'


@pytest.mark.parametrize('row', [row for row in config.ROWS if row.startswith('eq')])
def test_spec_of_every_table1_row(row):
    """@ds: the stem's stream through stage 1, then blocks 4, 8, 14 and 16 start streams."""
    model_config = config.row_config(row).model
    spec = symmetry.group_spec(model_config)
    if model_config.placement == 'all':
        widths = [w for w, depth in zip((64, 128, 256, 512), (3, 4, 6, 3)) for _ in range(depth)]
        assert [s.name for s in spec.streams[1:]] == [b.name for b in spec.structure.blocks]
    else:
        widths = [128, 256, 512, 512]
        assert [s.name for s in spec.streams] == [
            'stem', 'stage2_block1', 'stage3_block1', 'stage4_block1', 'stage4_block3']
        assert spec.streams[0].blocks == ('stage1_block1', 'stage1_block2', 'stage1_block3')
    assert [s.width for s in spec.streams] == [64] + widths
    assert [s.group for s in spec.streams] == ['scaled_permutation'] + (len(spec.streams) - 1) * [
        symmetry.ADMITTED[model_config.activation]]
    assert len(spec.hidden) == sum(model_config.depths) == len(spec.structure.blocks)


@pytest.mark.parametrize('architecture', sorted(ARCHITECTURES))
def test_spec_covers_every_axis(architecture):
    """Every matrix axis and bias of the form is moved by a stream or a hidden symmetry, and each
    entry's axis has the size the spec says (Git Re-Basin's lesson: specs must match the model)."""
    _, variables, spec = make_case(architecture, 'softball', 'ds')
    form = symmetry.fold(spec, variables)
    covered = set()
    for stream in spec.streams:
        for e in stream.entries:
            assert form[e.path[0]][e.path[1]].shape[e.axis] == stream.width * e.repeat, e
            covered.add((*e.path, e.axis))
    for hidden in spec.hidden:
        for e in hidden.entries:
            size = form[e.path[0]][e.path[1]].shape[e.axis]
            assert size % hidden.size == 0 and (e.power == 0 or size % hidden.scale_size == 0), e
            covered.add((*e.path, e.axis))
    expected = {(layer, key, axis) for layer, arrays in form.items() for key, x in arrays.items()
                if x.ndim <= 2 for axis in range(x.ndim)}
    expected -= {('head', 'kernel', 1), ('head', 'bias', 0)}
    assert expected <= covered, expected - covered


def test_other_models_are_refused():
    """QHNet models and the baselines (tests/test_symmetry_baselines.py) only."""
    with pytest.raises(ValueError, match='covers QHNet models and the baselines'):
        symmetry.group_spec(flax.linen.Dense(3))
    assert symmetry.group_spec(config.row_config('resnet50').model).structure.model == 'ResNet50'


# Negative controls: elements outside the admitted group must change the logits.

def break_streams(spec, element, matrix):
    """The element with every activation-started stream's T replaced by matrix(T, n)."""
    streams = {name: (t if name == 'stem' else matrix(t, t.shape[0]))
               for name, t in element['streams'].items()}
    return {'streams': streams}


@pytest.mark.parametrize('activation,group', [('relu', 'O'), ('hardtanh', 'O'), ('softball', 'GL'),
                                              ('hardball', 'GL')])
def test_groups_the_activation_does_not_admit_change_the_logits(images, activation, group):
    _, variables, spec = make_case('eq3', activation, 'ds')
    groups_asked = {s.name: group for s in spec.streams[1:]}
    with pytest.raises(ValueError, match='does not contain'):
        symmetry.sample(spec, jax.random.key(0), group=groups_asked)
    element = symmetry.sample(spec, jax.random.key(0), cond=10.0, group=groups_asked, force=True,
                              hidden=False)
    with jax.enable_x64(True):
        form = symmetry.fold(spec, variables, np.float64)
        with pytest.raises(ValueError, match='is not in'):
            symmetry.act(spec, form, element)
        result = symmetry.verify(spec, form, element, images, force=True)
    assert result['error'] > 1e-3 and not result['invariant'], result


@pytest.mark.parametrize('activation', ['relu', 'softball'])
def test_admitted_element_in_the_wrong_basis_changes_the_logits(images, activation):
    """B^-1 T B for an admitted T: the same group, but acting in another basis of the stream."""
    _, variables, spec = make_case('eq3', activation, 'ds')
    rng = np.random.default_rng(0)
    element = symmetry.sample(spec, jax.random.key(0), hidden=False)

    def conjugate(t, n):
        basis = groups.sample_matrix(rng, 'GL', n, cond=10.0)
        return np.linalg.solve(basis, t @ basis)

    with jax.enable_x64(True):
        form = symmetry.fold(spec, variables, np.float64)
        wrong = break_streams(spec, element, conjugate)
        result = symmetry.verify(spec, form, wrong, images, force=True)
    assert result['error'] > 1e-3, result


# Round trips.

@pytest.mark.parametrize('architecture', sorted(ARCHITECTURES))
def test_act_then_inverse_returns_the_form(architecture):
    _, variables, spec = make_case(architecture, 'identity', 'all')
    element = symmetry.sample(spec, jax.random.key(4), cond=100.0)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        np.allclose, symmetry.inverse(symmetry.inverse(element)), element))
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-4)):
        form = symmetry.fold(spec, variables, dtype)
        moved = symmetry.act(spec, form, element)
        back = symmetry.act(spec, moved, symmetry.inverse(element))
        for layer in form:
            for key in form[layer]:
                assert back[layer][key].dtype == dtype
                scale = np.abs(form[layer][key]).max()
                np.testing.assert_allclose(back[layer][key], form[layer][key], rtol=0,
                                           atol=tol * scale, err_msg=f'{layer}/{key}')
        assert relative(moved['stage1_block2']['coef'], form['stage1_block2']['coef']) > 0.1


@pytest.mark.slow  # about 25 s: trains, transforms, saves and restores
def test_trained_model_transformed_saved_and_reloaded(digits):
    """Train 30 steps, transform by a tied element, write it as Flax variables of the mixing
    model, save and reload: the same predictions, the same accuracy."""
    images, labels = jnp.asarray(digits[0][:512]), jnp.asarray(digits[1][:512])
    model = small_model('eq3', 'softball', 'ds')
    variables = model.init(jax.random.key(0), images[:2], train=False)
    optimizer = optax.sgd(0.2, momentum=0.9)

    @jax.jit
    def step(variables, opt_state, batch):
        def loss_fn(p):
            logits, updates = model.apply({**variables, 'params': p}, images[batch], train=True,
                                          mutable=['batch_stats'])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels[batch]).mean()
            return loss, updates
        (_, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
        changes, opt_state = optimizer.update(grads, opt_state)
        return {'params': optax.apply_updates(variables['params'], changes), **updates}, opt_state

    opt_state = optimizer.init(variables['params'])
    for i in range(30):
        variables, opt_state = step(variables, opt_state, np.arange(128) + 128 * (i % 4))

    spec = symmetry.group_spec(model, tie_identity_shortcuts=True)
    element = symmetry.sample(spec, jax.random.key(5), cond=10.0)
    moved = symmetry.unfold(spec, symmetry.act(spec, symmetry.fold(spec, variables), element))
    reloaded = flax.serialization.msgpack_restore(flax.serialization.msgpack_serialize(moved))

    mixing_model = model.clone(mixing=True)
    before = np.asarray(model.apply(variables, images, train=False))
    after = np.asarray(mixing_model.apply(reloaded, images, train=False))
    assert relative(after, before) <= float32_tolerance(spec, symmetry.condition(element))
    accuracy = lambda logits: float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))
    np.testing.assert_array_equal(np.argmax(after, -1), np.argmax(before, -1))
    assert accuracy(after) == accuracy(before) > 0.3


# Bad input is refused with a message that names the problem.

@pytest.fixture(scope='module')
def identity_model():
    model = small_model('eq3', 'identity', 'ds')
    variables = random_variables(model, (16, 16, 16, 1))
    spec = symmetry.group_spec(model)
    return spec, variables, symmetry.fold(spec, variables)


def with_stream(element, name, t):
    return {'streams': {**element['streams'], name: t}, 'hidden': element['hidden']}


def with_hidden(block, perm, scale):
    return {'streams': {}, 'hidden': {block: {'perm': perm, 'scale': scale}}}


def test_bad_elements_are_refused(identity_model):
    spec, _, form = identity_model
    element = symmetry.sample(spec, jax.random.key(0))
    singular = np.eye(16)
    singular[3] = singular[2]
    rng = np.random.default_rng(0)
    cases = [
        (with_stream(element, 'stage2_block1', singular), 'singular'),
        (with_stream(element, 'stage2_block1', np.eye(8)), 'must be 16 x 16'),
        (with_stream(element, 'stage2_block1', np.full((16, 16), np.nan)), 'non-finite'),
        (with_stream(element, 'stage2_block1', groups.sample_matrix(rng, 'GL', 16, 1e5)),
         'badly conditioned'),
        (with_stream(element, 'stem', groups.sample_matrix(rng, 'O', 8)),
         'not in scaled_permutation'),
        (with_stream(element, 'stage9_block1', np.eye(8)), 'unknown names'),
        (with_hidden('stage1_block1', np.zeros(8, int), np.ones(32)), 'permutation of range'),
        (with_hidden('stage1_block1', np.arange(8), np.zeros(32)), 'finite nonzero'),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            symmetry.act(spec, form, bad)
    # Forcing admits other groups and bad conditioning, never a singular or misshapen T.
    symmetry.act(spec, form, cases[3][0], force=True)
    symmetry.act(spec, form, cases[4][0], force=True)
    for bad, message in cases[:2]:
        with pytest.raises(ValueError, match=message):
            symmetry.act(spec, form, bad, force=True)


def test_membership_is_checked_in_float64_at_the_forms_precision(images):
    """A float16 1.3 * Q is not orthogonal: T^T T = 1.69 I. Its dtype's eps must not set the
    slack (1e3 eps of float16 is 0.98); the form's float32 does. An integer T is refused by
    name, not by numpy's 'not inexact'."""
    model = small_model('eq3', 'softball', 'ds')
    spec = symmetry.group_spec(model)
    form = symmetry.fold(spec, random_variables(model, (16, 16, 16, 1)))
    q = groups.sample_matrix(np.random.default_rng(0), 'O', 16)
    element = {'streams': {'stage2_block1': (1.3 * q).astype(np.float16)}, 'hidden': {}}
    with pytest.raises(ValueError, match=r'not in O, .*T\^T T differs from I by 6.9'):
        symmetry.act(spec, form, element)
    with pytest.raises(ValueError, match='has dtype int64; a change of basis is a matrix of real'):
        symmetry.act(spec, form, {'streams': {'stage2_block1': np.eye(16, dtype=np.int64)}})
    # An orthogonal T in float64 is still admitted, and keeps the function.
    report = symmetry.verify(spec, form, {'streams': {'stage2_block1': q}, 'hidden': {}}, images)
    assert report['invariant']


@pytest.mark.parametrize('cond', [np.inf, np.nan, 0.5, 1e5])
def test_a_condition_number_without_a_tolerance_is_refused_when_sampling(identity_model, cond):
    spec, _, _ = identity_model
    with pytest.raises(ValueError, match=r'cond=.* must be a finite number in \[1, 10000\]'):
        symmetry.sample(spec, jax.random.key(0), cond=cond)
    if np.isfinite(cond) and cond > 1:  # beyond the validated range only when forced
        element = symmetry.sample(spec, jax.random.key(0), cond=cond, force=True)
        assert symmetry.condition(element) == pytest.approx(cond, rel=1e-6)


def test_bad_requests_are_refused(identity_model):
    spec, variables, form = identity_model
    with pytest.raises(ValueError, match='unknown group'):
        symmetry.sample(spec, jax.random.key(0), group='SL')
    with pytest.raises(ValueError, match='no streams named'):
        symmetry.sample(spec, jax.random.key(0), group={'stage7_block1': 'O'})
    with pytest.raises(ValueError, match='does not contain O'):
        symmetry.sample(spec, jax.random.key(0), group={'stem': 'O'})
    with pytest.raises(ValueError, match='64-bit'):
        symmetry.apply(spec, symmetry.fold(spec, variables, np.float64), np.zeros((1, 16, 16, 1)))
    with pytest.raises(ValueError, match='identity shortcut'):
        symmetry.unfold(spec, symmetry.act(spec, form, symmetry.sample(spec, jax.random.key(0))))


def test_bad_variables_are_refused(identity_model):
    spec, variables, _ = identity_model
    zero = jax.tree_util.tree_map(np.array, variables)
    zero['params']['stage2_block1']['derivative_bn']['scale'][[1, 5]] = 0.0
    message = r'stage2_block1/derivative_bn has scale 0 in channels \[1, 5\]'
    with pytest.raises(ValueError, match=message):
        symmetry.fold(spec, zero)
    other = random_variables(small_model('eq4', 'identity', 'ds'), (1, 16, 16, 1))
    with pytest.raises(ValueError, match='do not match the model'):
        symmetry.fold(spec, other)


def digits_model(**overrides):
    """The digits model of `python -m qhnet.main --config=configs/eq3_softball.py:digits`."""
    model_config = config.row_config('eq3_softball', 'digits').model
    model_config.update(overrides)
    return models.build(model_config)


def test_variables_of_another_depth_are_refused():
    """Both ways: extra blocks are not dropped, missing ones are named."""
    shallow, deep = digits_model(depths=(1, 1)), digits_model(depths=(2, 1))
    shallow_spec, deep_spec = symmetry.group_spec(shallow), symmetry.group_spec(deep)
    with pytest.raises(ValueError, match=r'do not match the model: extra batch_stats/'
                                         r'stage1_block2, params/stage1_block2, which the model'):
        symmetry.fold(shallow_spec, random_variables(deep, (1, 8, 8, 1)))
    with pytest.raises(ValueError, match=r'do not match the model: missing batch_stats/'
                                         r'stage1_block2, params/stage1_block2;'):
        symmetry.fold(deep_spec, random_variables(shallow, (1, 8, 8, 1)))
    variables = jax.tree_util.tree_map(np.array, random_variables(shallow, (1, 8, 8, 1)))
    variables['params']['head']['extra'] = np.zeros(3)
    del variables['batch_stats']['stem_bn']['var']
    with pytest.raises(ValueError, match=r'missing batch_stats/stem_bn/var; extra '
                                         r'params/head/extra'):
        symmetry.fold(shallow_spec, variables)


def test_form_of_another_model_is_refused():
    """apply, act, verify and unfold refuse a form folded for another model (here the form of
    Eq. (4) with weight sharing, which has no mix_in, for an Eq. (3) spec)."""
    spec = symmetry.group_spec(digits_model())
    images = np.zeros((2, 8, 8, 1), np.float32)
    element = symmetry.sample(spec, jax.random.key(0))
    fix = "fold the variables with this model's spec"
    others = [
        (dict(equation=4), 'stage1_block1 lacks mix_in and has mix_out, which the spec'),
        (dict(depths=(2, 1)), 'the form has stage1_block2, which the spec'),
        (dict(widths=(16, 64)),
         r"stage2_block1/combine has shape \(64, 64\), but stream 'stage2_block1' needs 32"),
    ]
    for overrides, message in others:
        model = digits_model(**overrides)
        other_spec = symmetry.group_spec(model)
        form = symmetry.fold(other_spec, random_variables(model, (1, 8, 8, 1)))
        for use in (lambda: symmetry.apply(spec, form, images),
                    lambda: symmetry.act(spec, form, element),
                    lambda: symmetry.verify(spec, form, element, images),
                    lambda: symmetry.unfold(spec, form)):
            with pytest.raises(ValueError, match=f'the form does not match the spec: {message}.*'
                                                 f'{fix}'):
                use()


def test_beyond_max_condition_is_not_verifiable(identity_model, images):
    """A forced GL element with cond(T) = 1e6: the tolerance stops at its value for
    MAX_CONDITION and the report says the check cannot be made, rather than a pass."""
    spec, _, form = identity_model
    width = max(s.width for s in spec.streams)
    element = symmetry.sample(spec, jax.random.key(3), cond=1e6, force=True)
    result = symmetry.verify(spec, form, element, images, force=True)
    assert result['kappa'] == pytest.approx(1e6)
    assert result['tolerance'] == symmetry.invariance_tolerance(np.float32, MAX_CONDITION, width)
    assert result['verifiable'] is False and result['invariant'] is False
    assert result['note'].startswith('not verifiable at this condition number')
    assert json.loads(json.dumps(result)) == result
    within = symmetry.verify(spec, form, symmetry.sample(spec, jax.random.key(3), cond=1e3),
                             images)
    assert within['verifiable'] is True and within['invariant'] is True and 'note' not in within


def test_images_of_the_wrong_shape_are_refused(identity_model, images):
    spec, _, form = identity_model
    element = symmetry.sample(spec, jax.random.key(0))
    for bad in (images[:0], np.repeat(images, 3, axis=-1), images[0], images[:, :0]):
        message = (r'images must be an NHWC batch of shape \(N, H, W, 1\) with N, H, W >= 1 '
                   r'and 1 the input channels of the stem kernel \(3, 3, 1, 8\); got shape '
                   + re.escape(str(bad.shape)))
        with pytest.raises(ValueError, match=message):
            symmetry.verify(spec, form, element, bad)


# The package's layout.

# The chain of qhnet/symmetry (its __init__ docstring): a module imports from the package only
# modules of earlier layers, and `groups` and `testing`, which import nothing from it.
IMPORT_LAYERS = (('structure',), ('spec',), ('folding',), ('qhnet_family', 'baseline_family'),
                 ('families',), ('action',), ('slicing', 'rounding', 'checks', 'align'),
                 ('quantize',),
                 ('__init__',), ('commands',), ('__main__',))
LEAVES = ('groups', 'testing')


def symmetry_imports(path: pathlib.Path, modules: set[str]) -> list[tuple[str, bool]]:
    """(module of qhnet.symmetry, inside a function?) for each import from the package in the
    file; `from qhnet.symmetry import name` of a name that is no module imports `__init__`."""
    tree = ast.parse(path.read_text())
    in_functions = {id(node) for function in ast.walk(tree)
                    if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for node in ast.walk(function)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name.split('.') for alias in node.names]
        elif isinstance(node, ast.ImportFrom):  # relative to qhnet.symmetry, if `level`
            base = ['qhnet', 'symmetry'][:3 - node.level] if node.level else []
            base += node.module.split('.') if node.module else []
            targets = [base] if len(base) > 2 else [base + [alias.name] for alias in node.names]
        else:
            continue
        for parts in targets:
            if parts[:2] == ['qhnet', 'symmetry']:
                module = parts[2] if len(parts) > 2 and parts[2] in modules else '__init__'
                found.append((module, id(node) in in_functions))
    return found


def chain_problems(directory: pathlib.Path) -> list[str]:
    """Every way in which the modules in `directory` break the chain (`IMPORT_LAYERS`)."""
    rank = {name: i for i, layer in enumerate(IMPORT_LAYERS) for name in layer}
    modules = {path.stem for path in directory.glob('*.py')}
    unplaced = modules - set(rank) - set(LEAVES)
    problems = [f'{module} has no place in the chain' for module in sorted(unplaced)]
    for module in sorted(modules):
        for imported, in_function in symmetry_imports(directory / f'{module}.py', modules):
            if in_function:
                problems.append(f'{module} imports {imported} inside a function')
            elif module in LEAVES:
                problems.append(f'{module} imports {imported}; it must import nothing from the '
                                'package')
            elif module in rank and imported not in LEAVES and not (
                    imported in rank and rank[imported] < rank[module]):
                problems.append(f'{module} imports {imported}, which is not earlier in the chain')
    return list(dict.fromkeys(problems))


def test_imports_form_a_chain():
    """qhnet/symmetry imports one way: structure < spec < folding < {qhnet_family,
    baseline_family} < families < action < {slicing, rounding, checks} < quantize < __init__ <
    __main__, each module from earlier ones only (and from groups, testing), and never inside a
    function."""
    directory = pathlib.Path(symmetry.__file__).parent
    assert {'structure', 'families', 'action'} <= {p.stem for p in directory.glob('*.py')}
    assert chain_problems(directory) == []
