"""A fresh process that compiles through a compile cache: `python -m tests.compile_cache_child STORE KEY DIR`.

Prints one JSON line: whether the cache object was found, inductor's misses and hits, the
bytes saved (after a compile), and the compiled function's output.
"""

import json
import sys

from actors.compile_cache import CompileCache, inductor_counts


def main(store_uri: str, key: str, local_dir: str) -> None:
    cache = CompileCache(store_uri, key, local_dir)
    cache.activate()  # before anything compiles
    found = cache.load()

    import torch
    import torch.nn.functional as F

    def norm_act(x, gamma):  # the shape of the decoder's compiled regions: norm, gain, SiLU
        return F.silu(F.normalize(x.float(), dim=1).to(x.dtype) * gamma)

    fn = torch.compile(norm_act, dynamic=False, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    out = fn(torch.randn(1, 8, 3, 4, 4, generator=g), torch.randn(1, 8, 1, 1, 1, generator=g))
    misses, hits = inductor_counts()
    saved = cache.save() if misses else 0
    print(json.dumps({"found": found, "misses": misses, "hits": hits, "saved": saved,
                      "out": out.flatten()[:8].tolist()}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
