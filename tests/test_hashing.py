import imagehash
import numpy as np
import pytest
from PIL import Image

from bloodcell.curation import hashing


@pytest.fixture(scope="module")
def real_images(original_files):
    # Mixed sizes (360x363, 366x369, 360x360): real analyser output.
    return [np.asarray(Image.open(f).convert("RGB")) for f in original_files[::2]]


@pytest.mark.parametrize("hash_size", [8, 16])
def test_dhash_is_bit_for_bit_imagehash(real_images, hash_size):
    codes = hashing.dhash_batch(real_images, hash_size)
    expected = [str(imagehash.dhash(Image.fromarray(im), hash_size)) for im in real_images]
    assert [hashing.to_hex(c) for c in codes] == expected


def test_phash_is_bit_for_bit_imagehash(real_images):
    codes = hashing.phash_batch(real_images)
    expected = [str(imagehash.phash(Image.fromarray(im))) for im in real_images]
    assert [hashing.to_hex(c) for c in codes] == expected


def test_hamming_matches_imagehash_difference(real_images):
    a, b = real_images[0], real_images[1]
    codes = hashing.dhash_batch([a, b])
    assert hashing.hamming(codes[0], codes[1]) == imagehash.dhash(Image.fromarray(a)) - imagehash.dhash(Image.fromarray(b))


def test_pixel_md5_depends_on_pixels_not_file_format(real_images, tmp_path):
    image = real_images[0]
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(image).save(tmp_path / "a.bmp")
    png = np.asarray(Image.open(tmp_path / "a.png"))
    bmp = np.asarray(Image.open(tmp_path / "a.bmp"))
    assert hashing.pixel_md5(png) == hashing.pixel_md5(bmp) == hashing.pixel_md5(image)
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    assert hashing.pixel_md5(changed) != hashing.pixel_md5(image)


def test_near_pairs_equals_brute_force():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(3000, 8), dtype=np.uint8)
    # Plant pairs at known distances.
    for i, flips in enumerate([0, 1, 3, 6, 10, 11, 20]):
        codes[2000 + i] = codes[i]
        bits = np.unpackbits(codes[2000 + i])
        bits[rng.choice(64, flips, replace=False)] ^= 1
        codes[2000 + i] = np.packbits(bits)
    for radius in (0, 6, 10):
        found = {tuple(p) for p in hashing.near_pairs(codes, radius, block=700).tolist()}
        distances = hashing.hamming(codes[:, None, :], codes[None, :, :])
        i, j = np.nonzero(np.triu(distances <= radius, k=1))
        assert found == set(zip(i.tolist(), j.tolist()))
        assert (0, 2000) in found
        assert ((4, 2004) in found) == (radius >= 10)
