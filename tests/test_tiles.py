"""The fused step's projection tiles: the heuristic, and the measured per-device table it ships."""
import json

import pytest

from crsm_core.backbone import tiles
from crsm_core.backbone.tiles import Tiles, proj_tiles

H200 = "NVIDIA H200"


def test_heuristic_tiles_per_batch():
    # one row: a GEMV, the whole of K in one block; more rows: tl.dot tiles of at least 16 rows
    gemv = proj_tiles(1, 3352, 768)
    assert (gemv.block_m, gemv.block_n, gemv.block_k) == (1, 16, 1024)
    assert proj_tiles(1, 768, 1536).block_n == 8          # out_proj: more, narrower programs
    assert proj_tiles(3, 3352, 768).block_m == 16
    assert proj_tiles(64, 3352, 768).block_m == 64
    assert proj_tiles(80, 3352, 768).block_m == 64
    assert proj_tiles(64, 3352, 768, "a GPU the table does not have") == proj_tiles(64, 3352, 768)


def test_the_shipped_table_holds_valid_tiles():
    table = json.loads(tiles.TUNED_TILES.read_text())
    assert H200 in table
    for shape, buckets in table[H200].items():
        n, k = map(int, shape.split("x"))
        for bucket, fields in buckets.items():
            t = Tiles(**fields)
            assert t.block_m >= 16 and t.block_m <= max(16, int(bucket)), (shape, bucket, t)
            for size in (t.block_m, t.block_n, t.block_k):
                assert size & (size - 1) == 0
            assert t.num_warps in (1, 2, 4, 8, 16)


@pytest.mark.parametrize("m, bucket", [(2, "16"), (16, "16"), (17, "64"), (64, "64"), (65, "256"), (300, "256")])
def test_a_batch_takes_the_smallest_measured_bucket_that_holds_it(m, bucket):
    table = json.loads(tiles.TUNED_TILES.read_text())[H200]["3352x768"]
    assert proj_tiles(m, 3352, 768, H200) == Tiles(**table[bucket])


def test_one_row_and_unmeasured_shapes_keep_the_heuristic():
    assert proj_tiles(1, 3352, 768, H200) == proj_tiles(1, 3352, 768)          # the GEMV path
    assert proj_tiles(16, 1000, 64, H200) == proj_tiles(16, 1000, 64)          # a shape the sweep did not see
