"""
Pictures of where the 20 queries look: a heat-map colouring and the 5 x 4 grid
of each query's cross-attention map laid over the X-ray, used by sample.py and
demo.py.
"""
import numpy as np
from PIL import Image, ImageDraw

from chexpert import CONDITIONS, REGIONS


def heat(values):
    """A (h, w) array in [0, 1] -> an RGB uint8 heat map (black-red-yellow-white)."""
    v = np.clip(values, 0, 1)[..., None]
    rgb = np.concatenate([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)
    return (rgb * 255).astype(np.uint8)


def attention_grid(image, attention, gate, title, cell=160, prior='none', atlas=None):
    """A 5 x 4 PNG grid: the X-ray with each query's attention map (N patches) laid over it.
    With an anatomical prior, each anatomical query's atlas box is drawn on its map, and the
    maps are shown per patch (no smoothing), so a strict prior's zero outside the box shows."""
    names = list(CONDITIONS) + [f"region: {r}" for r in REGIONS]
    g = int(round(attention.shape[-1] ** 0.5))
    base = np.asarray(image.convert('L').resize((cell, cell)), dtype=np.float32)[..., None] / 255
    cols, rows, header = 5, 4, 24
    canvas = Image.new('RGB', (cols * cell, rows * (cell + 14) + header), 'white')
    draw = ImageDraw.Draw(canvas)
    prior_text = f"   anatomical prior: {prior}" if prior != 'none' else ''
    draw.text((4, 4), f"{title}   gate (weight of the global token) = {gate:.3f}{prior_text}", fill='black')
    resample = Image.BILINEAR if prior == 'none' else Image.NEAREST
    for q, name in enumerate(names[:len(attention)]):  # 14 maps without anatomical queries
        a = attention[q].reshape(g, g)
        a = (a - a.min()) / (a.max() - a.min() + 1e-12)  # per-map contrast: where this query looks
        a = np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((cell, cell), resample)) / 255
        overlay = (0.55 * base * 255 + 0.45 * heat(a)).astype(np.uint8)
        x, y = (q % cols) * cell, header + (q // cols) * (cell + 14)
        canvas.paste(Image.fromarray(overlay), (x, y + 14))
        draw.text((x + 2, y + 1), name[:26], fill='black')
        if atlas and q >= len(CONDITIONS):
            x0, y0, x1, y1 = (v * cell for v in atlas[REGIONS[q - len(CONDITIONS)]])
            draw.rectangle([x + x0, y + 14 + y0, x + x1, y + 14 + y1], outline=(0, 200, 255))
    return canvas
