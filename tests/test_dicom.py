"""DICOM input: data.load_image on small DICOM files built here with pydicom (MONOCHROME1 and 2,
12-bit with a window and a rescale, 8-bit, a compressed transfer syntax pydicom can and one it
can't decode, no extension), the errors without pydicom, and preparation writing PNG copies."""
import csv
import os
import sys

import numpy as np
import pytest
from PIL import Image

import data
import prepare
from conftest import iu_fixture

pydicom = pytest.importorskip('pydicom')


def write_dicom(path, pixels, photometric='MONOCHROME2', bits_stored=None, window=None, rescale=None,
                transfer_syntax=None, pixel_data=None):
    """A one-frame Digital X-Ray DICOM file of `pixels` (uint8 or uint16, (H, W))."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.1.1'  # Digital X-Ray Image Storage, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, 'DX'
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, photometric, 0
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = pixel_data if pixel_data is not None else pixels.tobytes()
    if pixel_data is not None:
        ds['PixelData'].VR = 'OB'
    ds.save_as(str(path), enforce_file_format=True)
    return path


def ramp(lo, hi, dtype, shape=(20, 64)):
    """Dark on the left, bright on the right: every column one value from lo to hi."""
    return np.tile(np.linspace(lo, hi, shape[1]).round().astype(dtype), (shape[0], 1))


def gray(path):
    im = data.load_image(str(path))
    assert im.mode == 'RGB'
    a = np.asarray(im).astype(int)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0]


def test_12_bit_monochrome2_is_scaled_min_max_not_clipped(tmp_path):
    pixels = ramp(100, 4000, np.uint16)  # 12-bit values: convert('L') would clip all above 255
    a = gray(write_dicom(tmp_path / 'x.dcm', pixels, bits_stored=12))
    assert a.shape == (20, 64) and a.min() == 0 and a.max() == 255
    assert (np.diff(a[0]) >= 0).all() and len(np.unique(a[0])) > 60  # the gradient survives, every step
    want = (pixels[0].astype(float) - 100) * 255 / 3900
    assert np.abs(a[0] - want).max() <= 0.5 + 1e-9


def test_monochrome1_is_inverted(tmp_path):
    pixels = ramp(100, 4000, np.uint16)
    m2 = gray(write_dicom(tmp_path / 'm2.dcm', pixels, bits_stored=12))
    m1 = gray(write_dicom(tmp_path / 'm1.dcm', pixels, 'MONOCHROME1', bits_stored=12))
    assert m1[:, 0].mean() == 255 and m1[:, -1].mean() == 0  # low values are white in MONOCHROME1
    assert (m1 == 255 - m2).all()


def test_window_and_rescale_are_applied_before_scaling(tmp_path):
    pixels = ramp(0, 4095, np.uint16, (8, 256))
    # rescale: stored value v means 2 v - 1000; window centre 3000, width 2000 in those units: 2000..4000
    a = gray(write_dicom(tmp_path / 'w.dcm', pixels, bits_stored=12, window=(3000, 2000), rescale=(2, -1000)))
    units = 2.0 * pixels[0] - 1000
    assert (a[0][units < 1990] == 0).all() and (a[0][units > 4010] == 255).all()  # outside the window
    inside = (units > 2100) & (units < 3900)
    assert inside.sum() > 20
    want = (units[inside] - 2000) / 2000 * 255  # linear inside, to within DICOM's half-unit offsets
    assert np.abs(a[0][inside] - want).max() < 1.5
    plain = gray(write_dicom(tmp_path / 'p.dcm', pixels, bits_stored=12))
    assert not (plain == a).all()  # the window changed what we see


def test_8_bit_data_keeps_its_values(tmp_path):
    pixels = ramp(10, 200, np.uint8)
    a = gray(write_dicom(tmp_path / 'e.dcm', pixels))
    assert (a == pixels).all()  # not stretched: 8-bit data is already what a viewer shows


def test_a_compressed_dicom_pydicom_can_decode_loads(tmp_path):
    from pydicom.uid import RLELossless
    pixels = ramp(0, 4095, np.uint16)
    path = write_dicom(tmp_path / 'plain.dcm', pixels, bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.save_as(str(tmp_path / 'rle.dcm'))
    assert pydicom.dcmread(tmp_path / 'rle.dcm').file_meta.TransferSyntaxUID == RLELossless
    assert (gray(tmp_path / 'rle.dcm') == gray(path)).all()


def test_undecodable_and_broken_dicoms_are_value_errors_naming_the_file(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless
    pixels = ramp(0, 4095, np.uint16)
    write_dicom(tmp_path / 'jpegls.dcm', pixels, bits_stored=12, transfer_syntax=JPEGLSLossless,
                pixel_data=encapsulate([b'\xff\xd8\xff\xf7 not really JPEG-LS \xff\xd9']))
    (tmp_path / 'text.dcm').write_text('not a DICOM file')
    (tmp_path / 'empty.dcm').write_bytes(b'')
    no_pixels = pydicom.dcmread(write_dicom(tmp_path / 'no_pixels.dcm', pixels, bits_stored=12))
    del no_pixels.PixelData
    no_pixels.save_as(str(tmp_path / 'no_pixels.dcm'))
    for name in ('jpegls.dcm', 'text.dcm', 'empty.dcm', 'no_pixels.dcm', 'missing.dcm'):
        with pytest.raises(ValueError, match=name):
            data.load_image(str(tmp_path / name))


def test_a_dicom_without_extension_is_recognized(tmp_path):
    pixels = ramp(100, 4000, np.uint16)
    write_dicom(tmp_path / 'x.dcm', pixels, bits_stored=12)
    os.rename(tmp_path / 'x.dcm', tmp_path / 'IM000001')
    assert gray(tmp_path / 'IM000001').max() == 255
    (tmp_path / 'junk').write_bytes(b'\0' * 300)  # neither an image nor a DICOM: still the usual error
    with pytest.raises(ValueError, match='junk'):
        data.load_image(str(tmp_path / 'junk'))


def test_dicom_bomb_limit(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / 'big.dcm', ramp(0, 4095, np.uint16, (64, 64)), bits_stored=12)
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # 64 x 64 = 4096 px is a "bomb" now
    with pytest.raises(ValueError, match='big.dcm.*limit'):
        data.load_image(str(path))


def test_without_pydicom_the_error_names_the_file_and_the_fix(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / 'x.dcm', ramp(0, 4095, np.uint16), bits_stored=12)
    monkeypatch.setitem(sys.modules, 'pydicom', None)  # import pydicom now fails as if not installed
    with pytest.raises(ImportError, match=r'x\.dcm.*pip install pydicom'):
        data.load_image(str(path))


def test_preparation_reads_dicom_sources_and_writes_png_copies(tmp_path):
    src = iu_fixture(tmp_path / 'raw', n=8)
    images = src / 'images' / 'images_normalized'
    write_dicom(images / '5_IM-1.dcm', ramp(0, 4095, np.uint16, (600, 500)), 'MONOCHROME1', bits_stored=12)
    with open(src / 'indiana_projections.csv') as f:
        rows = list(csv.reader(f))
    with open(src / 'indiana_projections.csv', 'w', newline='') as f:
        csv.writer(f).writerows([u, '5_IM-1.dcm' if n == '5_IM-1.dcm.png' else n, p] for u, n, p in rows)
    out = tmp_path / 'prepared'
    prepare.prepare_iu(str(src), str(out), seed=0, short_side=448, n_workers=1)
    records = [r for s in ('train', 'val', 'test') for r in data.read_split(str(out), s)]
    r5 = next(r for r in records if r['uid'] == '5')
    assert r5['image'] == 'images_448/5_IM-1.dcm.png' and r5['id'] == '5_IM-1'
    with Image.open(out / r5['image']) as im:
        assert im.format == 'PNG' and im.mode == 'L' and im.size == (448, round(600 * 448 / 500))
        a = np.asarray(im)
    assert a[:, :20].mean() > 240 and a[:, -20:].mean() < 15  # MONOCHROME1: the low values on the left are white
    assert len(records) == 6  # the other studies as before (3: both sections empty, 4: no frontal image)


def test_sample_lists_dicom_files(tmp_path):
    import sample
    write_dicom(tmp_path / 'b.dcm', ramp(0, 4095, np.uint16), bits_stored=12)
    Image.fromarray(ramp(0, 255, np.uint8)).save(tmp_path / 'a.png')
    (tmp_path / 'notes.txt').write_text('x')
    assert [os.path.basename(f) for f in sample.list_images(str(tmp_path))] == ['a.png', 'b.dcm']


def test_mimic_preparation_reads_a_dicom_original_where_no_jpg_is(tmp_path):
    from test_prepare import mimic_fixture
    src = tmp_path / 'mimic'
    src.mkdir()
    mimic_fixture(src)
    jpg = src / 'files' / 'p10' / 'p10' / 's100' / 'd100.jpg'
    jpg.unlink()
    write_dicom(jpg.with_suffix('.dcm'), ramp(0, 4095, np.uint16, (500, 600)), bits_stored=12)
    m = prepare.prepare_mimic(str(src), str(tmp_path / 'prepared'), short_side=448, n_workers=1)
    assert m['counts'] == {'train': 1, 'val': 1, 'test': 1}  # nothing dropped for it
    r = data.read_split(str(tmp_path / 'prepared'), 'train')[0]
    assert r['id'] == 'd100' and r['image'] == 'images_448/d100.png'
    with Image.open(tmp_path / 'prepared' / r['image']) as im:
        assert im.format == 'PNG' and im.size == (round(600 * 448 / 500), 448)
        assert np.asarray(im)[:, -10:].mean() > 240  # the ramp's bright end
