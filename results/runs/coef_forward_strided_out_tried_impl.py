def _poly_coefficients_forward(stacked: Tensor, degree: int) -> Tensor:
    """``PolyCoefficients``' forward: the compiled kernel where it serves, else the recursion
    in batched products written into the output's column blocks (no temporaries)."""
    hm, rows, s = stacked.shape
    if _kernels.usable(stacked, size=s, sizes=_kernels.POLY_SIZES):
        return _kernels.poly_coefficients_forward(stacked.contiguous(), degree)[0]
    a = rows // s
    offsets = _kernels.poly_offsets(degree, a)
    out = _kernels._fresh(stacked, hm, s, offsets[-1] * s)
    out[:, :, :s].copy_(torch.eye(s, dtype=stacked.dtype, device=stacked.device))
    first, second = stacked[:, :s], stacked[:, s:]
    for k in range(1, degree + 1):
        prev = out[:, :, offsets[k - 1] * s : offsets[k] * s]
        level = out[:, :, offsets[k] * s : offsets[k + 1] * s]
        if a == 1:
            torch.bmm(stacked, prev, out=level)
            continue
        # C_(i, k-i) = B_0 C_(i-1, k-i) + B_1 C_(i, k-1-i): B_1's products fill blocks 0..k-1,
        # B_0's last product block k, and the rest of B_0's are added to blocks 1..k-1
        torch.bmm(second, prev, out=level[:, :, : k * s])
        torch.bmm(first, prev[:, :, (k - 1) * s :], out=level[:, :, k * s :])
        if k > 1:
            level[:, :, s : k * s].baddbmm_(first, prev[:, :, : (k - 1) * s])
    return out
