from spmd_diff.plan.cost import DitDims, MIN_DEADLINE_S, dit_forward_flops, predict_item_cost, wait_deadline_s


def test_flops_match_the_measured_wan_1_3b_forward():
    # DESIGN.md: 1.3B, 480p x 81 frames (32,760 tokens): ~2.8e14 FLOP per forward
    flops = dit_forward_flops(32760, DitDims(30, 1536, 8960, 512))
    assert 2.6e14 < flops < 3.0e14


def test_predicted_gpu_times_are_in_the_measured_range():
    cost = predict_item_cost(32760, DitDims(30, 1536, 8960, 512), 50, True, 81 * 480 * 832, "cuda:0")
    assert 40 < cost.denoise_s < 120  # measured: ~61 s of DiT for a 50-step CFG video
    assert 0.5 < cost.decode_s < 5  # measured: 1.8 s


def test_deadline_uses_the_setting_or_a_floor():
    tiny = predict_item_cost(768, DitDims(2, 24, 32, 512, 1e5, 3), 4, True, 9 * 64 * 64, "cpu")
    assert wait_deadline_s(tiny, 0) == MIN_DEADLINE_S
    assert wait_deadline_s(tiny, 7.5) == 3 * 7.5  # a stage of 7.5 s: its own item and the one ahead, one producer
    big = predict_item_cost(75600, DitDims(40, 5120, 13824, 512), 50, True, 81 * 720 * 1280, "cuda")
    assert wait_deadline_s(big, 0) == 5 * big.slowest_s > MIN_DEADLINE_S


def test_deadline_grows_with_the_producers_a_consumer_serves():
    """470 DiT leaders into one decoder: a leader's wait for credit may hold an item of each other leader."""
    big = predict_item_cost(75600, DitDims(40, 5120, 13824, 512), 50, True, 81 * 720 * 1280, "cuda")
    one, many = wait_deadline_s(big, 0, fan_in=1), wait_deadline_s(big, 0, fan_in=470)
    assert many == (4 + 470) * big.slowest_s and many > 470 * big.slowest_s > one
    # An explicit setting is the longest one stage may take: the queue of 470 producers still counts.
    assert wait_deadline_s(big, 7.5, fan_in=470) == (2 + 470) * 7.5
