"""The symmetry toolkit on the baselines (`qhnet.symmetry.baseline_family`): ResNet50,
MobileNetV3Large.

Both models as their configs build them (and, for the fold, the small-input ResNet50 of the
Fashion-MNIST variant), on 4 real digits at 32x32 RGB, with variables
from `random_variables` (non-trivial BN statistics). Tolerances as in test_symmetry.py: the
fold matches the Flax model to 1e-5 (float32) and 1e-10 (float64); admitted elements change
the logits by at most 1e-9 in float64 and by at most `verify`'s tolerance in float32;
negative controls (elements the activations do not admit, forced) by more than 1e-3.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qhnet import config, models
from qhnet import symmetry
from qhnet.symmetry import groups
from qhnet.symmetry.testing import random_variables
from tests.conftest import resize_images

IMAGE_SHAPE = (4, 32, 32, 3)


@pytest.fixture(scope='module')
def images(digits) -> np.ndarray:
    return np.asarray(resize_images(digits[0][:IMAGE_SHAPE[0]], IMAGE_SHAPE[1], IMAGE_SHAPE[3]))


def build_case(name: str) -> dict:
    """A row's model as its config builds it; '<row>:<variant>', as that variant's does."""
    name, _, variant = name.partition(':')
    model = models.build(config.row_config(name, variant or None).model)
    variables = random_variables(model, IMAGE_SHAPE)
    spec = symmetry.group_spec(model)
    return dict(model=model, variables=variables, spec=spec, flax32=jax.jit(model.apply),
                form32=symmetry.fold(spec, variables),
                form64=symmetry.fold(spec, variables, np.float64))


@pytest.fixture(scope='module')
def cases():
    """Each model built once for this module (and freed after it)."""
    return functools.cache(build_case)


@pytest.fixture(scope='module', params=['mobilenet_v3_large', 'resnet50'])
def case(request, cases) -> dict:
    return cases(request.param)


@pytest.fixture(scope='module')
def resnet(cases) -> dict:
    return cases('resnet50')


@pytest.fixture(scope='module')
def mobilenet(cases) -> dict:
    return cases('mobilenet_v3_large')


def flax_logits(case, images, dtype=np.float32) -> np.ndarray:
    """The Flax model in eval mode; in float64, the last Dense's output before the float32 cast."""
    if dtype == np.float32:
        return np.asarray(case['flax32'](case['variables'], images))
    variables = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), case['variables'])
    model = case['model'].clone(dtype=jnp.float64)
    _, state = jax.jit(functools.partial(model.apply, capture_intermediates=True,
                                         mutable=['intermediates']))(
        variables, jnp.asarray(images, jnp.float64))
    return np.asarray(state['intermediates'][case['spec'].structure.head[-1].path]['__call__'][0])


def relative(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def only(streams: dict) -> dict:
    return {'streams': streams, 'hidden': {}}


# The fold and the claim.

def test_fold_matches_the_flax_model(case, images):
    spec = case['spec']
    logits32 = symmetry.apply(spec, case['form32'], images)
    assert relative(logits32, flax_logits(case, images)) <= 1e-5
    with jax.enable_x64(True):
        logits64 = symmetry.apply(spec, case['form64'], images)
        assert relative(logits64, flax_logits(case, images, np.float64)) <= 1e-10


def test_fold_matches_the_small_input_resnet(cases, images):
    test_fold_matches_the_flax_model(cases('resnet50:fashion_mnist'), images)


def test_admitted_elements_leave_the_logits_unchanged(case, images):
    spec = case['spec']
    element = symmetry.sample(spec, jax.random.key(1), cond=10.0)
    with jax.enable_x64(True):
        result = symmetry.verify(spec, case['form64'], element, images)
    assert result['error'] <= 1e-9 and result['invariant'], result
    result = symmetry.verify(spec, case['form32'], element, images)
    assert result['invariant'], result


def test_unfolded_element_runs_in_the_flax_model(case, images):
    """The moved form written back as the same model's variables computes the same logits."""
    spec = case['spec']
    element = symmetry.sample(spec, jax.random.key(2), cond=10.0)
    moved = symmetry.unfold(spec, symmetry.act(spec, case['form32'], element))
    before = flax_logits(case, images)
    after = np.asarray(case['flax32'](moved, images))
    tolerance = symmetry.invariance_tolerance(np.float32, symmetry.condition(element),
                                              max(s.width for s in spec.streams))
    assert relative(after, before) <= tolerance
    head = spec.structure.head[-1].path
    original = case['variables']['params'][head]['kernel']
    assert relative(moved['params'][head]['kernel'], original) > 0.1


# The spec, derived from the model.

def test_resnet_streams(resnet):
    streams = {s.name: s for s in resnet['spec'].streams}
    blocks = [b.name for b in resnet['spec'].structure.blocks]
    assert {s.group for s in streams.values()} == {'scaled_permutation'}
    assert len(blocks) == 16 and len(streams) == 1 + 2 * 16 + 4
    residual = [s for s in resnet['spec'].streams if s.name in blocks]
    assert [(s.name, s.width, len(s.blocks)) for s in residual] == [
        ('stage1_block1', 256, 3), ('stage2_block1', 512, 4), ('stage3_block1', 1024, 6),
        ('stage4_block1', 2048, 3)]
    assert streams['stage3_block2/hidden2'].width == 256 and streams['stem'].width == 64
    assert residual[-1].entries[-1].path == ('head', 'kernel')


def test_mobilenet_streams(mobilenet):
    spec = mobilenet['spec']
    structure = spec.structure
    streams = {s.name: s for s in spec.streams}
    for block in structure.blocks:
        if block.expand:
            expected = {'relu': 'scaled_permutation', 'hard_swish': 'permutation'}
            assert streams[f'{block.name}/expanded'].group == expected[block.activation]
        if block.squeeze:
            assert streams[f'{block.name}/squeeze'].group == 'scaled_permutation'
    linear = [s for s in spec.streams if s.group == 'GL']
    assert [(s.name, s.width, s.blocks[-1]) for s in linear] == [
        ('block2', 24, 'block3'), ('block4', 40, 'block6'), ('block7', 80, 'block10'),
        ('block11', 112, 'block12'), ('block13', 160, 'block15')]
    # block1 does not expand: its depthwise conv and residual put it on the hswish stem stream.
    assert streams['stem'].group == 'permutation' and streams['stem'].blocks == ('block1',)
    assert streams['last_conv'].group == streams['fc1'].group == 'permutation'


def test_spec_covers_every_axis(case):
    """Every channel axis of the form (all but the images' and the logits') is moved by exactly
    one stream, with the stream's width."""
    spec, form = case['spec'], case['form32']
    covered = []
    for stream in spec.streams:
        for e in stream.entries:
            assert form[e.path[0]][e.path[1]].shape[e.axis] == stream.width, e
            covered.append((*e.path, e.axis))
    structure = spec.structure
    expected = {(layer, key, axis) for layer, arrays in form.items() for key, x in arrays.items()
                for axis in range(x.ndim) if x.ndim <= 2 or (axis >= 2 and x.shape[axis] > 1)}
    expected -= {(structure.stem.path, 'kernel', 2), (structure.head[-1].path, 'kernel', 1),
                 (structure.head[-1].path, 'bias', 0)}
    assert sorted(covered) == sorted(expected)


# Negative controls: elements outside the admitted group must change the logits.

def changes(case, images, element) -> float:
    spec = case['spec']
    with pytest.raises(ValueError, match='is not in'):
        symmetry.act(spec, case['form64'], element)
    with jax.enable_x64(True):
        return symmetry.verify(spec, case['form64'], element, images, force=True)['error']


def test_resnet_negative_controls(resnet, images):
    rng = np.random.default_rng(0)
    n = 128
    negative = groups.sample_matrix(rng, 'scaled_permutation', 512, 10.0)
    negative[:, rng.permutation(512)[:256]] *= -1
    errors = {
        'GL on a relu hidden set': changes(resnet, images, only(
            {'stage2_block2/hidden1': groups.sample_matrix(rng, 'GL', n, 10.0)})),
        'negative scalings on a residual stream': changes(resnet, images, only(
            {'stage2_block1': negative})),
        'O on the stem': changes(resnet, images, only(
            {'stem': groups.sample_matrix(rng, 'O', 64)})),
    }
    assert min(errors.values()) > 1e-3, errors


def test_mobilenet_negative_controls(mobilenet, images):
    """On these random variables the logits depend only weakly on the early layers (a scaling
    of the hswish stem alone changes them by ~1e-5), so most controls act on every set of a
    kind at once."""
    rng = np.random.default_rng(0)

    def draw(group, which):
        return only({s.name: groups.sample_matrix(rng, group, s.width, 10.0)
                     for s in mobilenet['spec'].streams if which(s)})

    errors = {
        'scalings on one hswish expanded set': changes(mobilenet, images, draw(
            'scaled_permutation', lambda s: s.name == 'block14/expanded')),
        'scalings on every hswish set': changes(mobilenet, images, draw(
            'scaled_permutation', lambda s: s.group == 'permutation')),
        'GL on every squeeze set': changes(mobilenet, images, draw(
            'GL', lambda s: s.name.endswith('/squeeze'))),
        'sign flips on every relu set': changes(mobilenet, images, draw(
            'signed_permutation', lambda s: s.group == 'scaled_permutation')),
    }
    assert min(errors.values()) > 1e-3, errors


# Round trips.

def test_act_then_inverse_returns_the_form(case):
    spec = case['spec']
    element = symmetry.sample(spec, jax.random.key(4), cond=100.0)
    for form, tol in ((case['form64'], 1e-12), (case['form32'], 1e-4)):
        moved = symmetry.act(spec, form, element)
        back = symmetry.act(spec, moved, symmetry.inverse(element))
        for layer in form:
            for key in form[layer]:
                assert back[layer][key].dtype == form[layer][key].dtype
                scale = np.abs(form[layer][key]).max()
                np.testing.assert_allclose(back[layer][key], form[layer][key], rtol=0,
                                           atol=tol * scale, err_msg=f'{layer}/{key}')
        head = spec.structure.head[-1].path
        assert relative(moved[head]['kernel'], form[head]['kernel']) > 0.1


# Bad input is refused with a message that names the problem.

def test_bad_elements_are_refused(mobilenet):
    spec, form = mobilenet['spec'], mobilenet['form32']
    rng = np.random.default_rng(0)
    singular = np.eye(24)
    singular[3] = singular[2]
    bad_elements = [
        (only({'block2': singular}), 'singular'),
        (only({'block2': np.eye(16)}), 'must be 24 x 24'),
        (only({'block7/expanded': groups.sample_matrix(rng, 'GL', 240, 10.0)}),
         'per-channel maps'),
        (only({'block2/expanded': groups.sample_matrix(rng, 'O', 64)}),
         'per-channel maps'),
        (only({'block4/squeeze': groups.sample_matrix(rng, 'O', 24)}),
         'not in scaled_permutation'),
        (only({'block2/hidden1': np.eye(24)}), 'unknown names'),
    ]
    for bad, message in bad_elements:
        with pytest.raises(ValueError, match=message):
            symmetry.act(spec, form, bad)
    # Forcing admits other groups, never a singular or misshapen T, nor a dense T on
    # per-channel maps (the form cannot hold it).
    symmetry.act(spec, form, bad_elements[4][0], force=True)
    for bad, message in bad_elements[:4]:
        with pytest.raises(ValueError, match=message):
            symmetry.act(spec, form, bad, force=True)


def test_bad_variables_are_refused(resnet, mobilenet):
    with pytest.raises(ValueError, match='do not match the model'):
        symmetry.fold(resnet['spec'], mobilenet['variables'])


def test_variables_with_extra_or_missing_layers_are_refused(resnet):
    """fold takes exactly the model's variables: an extra block is named, not dropped."""
    variables = jax.tree_util.tree_map(np.array, resnet['variables'])
    variables['params']['stage5_block1'] = variables['params']['stage4_block3']
    with pytest.raises(ValueError, match='extra params/stage5_block1, which the model has not'):
        symmetry.fold(resnet['spec'], variables)
    del variables['params']['stage5_block1'], variables['batch_stats']['stage4_block3']
    with pytest.raises(ValueError, match='missing batch_stats/stage4_block3;'):
        symmetry.fold(resnet['spec'], variables)


def test_form_of_another_model_is_refused(resnet, mobilenet, images):
    spec, form = resnet['spec'], mobilenet['form32']
    element = symmetry.sample(spec, jax.random.key(0))
    message = ("the form does not match the spec: the form lacks stage1_block1/Conv_0.*"
               "fold the variables with this model's spec")
    for use in (lambda: symmetry.apply(spec, form, images),
                lambda: symmetry.act(spec, form, element),
                lambda: symmetry.verify(spec, form, element, images),
                lambda: symmetry.unfold(spec, form)):
        with pytest.raises(ValueError, match=message):
            use()
    with pytest.raises(ValueError, match=r'images must be an NHWC batch of shape \(N, H, W, 3\)'):
        symmetry.verify(spec, resnet['form32'], element, images[..., :1])
