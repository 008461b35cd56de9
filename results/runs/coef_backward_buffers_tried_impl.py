def _poly_coefficients_backward(grad: Tensor, stacked: Tensor, out: Tensor, degree: int) -> Tensor:
    hm, rows, s = stacked.shape
    if _kernels.usable(stacked, out, grad, size=s, sizes=_kernels.POLY_SIZES):
        return _kernels.poly_coefficients_backward(
            grad.contiguous(), stacked.contiguous(), out.contiguous(), degree
        )
    a = rows // s
    offsets = _kernels.poly_offsets(degree, a)
    d_stacked = torch.zeros_like(stacked)
    st = stacked.mT
    fresh = _kernels._fresh
    level_grad = fresh(stacked, hm * rows * degree * s)
    carry_buf = fresh(stacked, hm * s * degree * s)
    carry = None
    for k in range(degree, 0, -1):
        g = grad[:, :, offsets[k] * s : offsets[k + 1] * s]
        prev = out[:, :, offsets[k - 1] * s : offsets[k] * s]
        if a == 1:
            g_prod = level_grad[: hm * s * s].view(hm, s, s)
            if carry is None: g_prod.copy_(g)
            else: torch.add(g, carry, out=g_prod)
        else:
            g_prod = level_grad[: hm * 2 * s * k * s].view(hm, 2 * s, k * s)
            if carry is None:
                g_prod[:, :s].copy_(g[:, :, s:]); g_prod[:, s:].copy_(g[:, :, : k * s])
            else:
                torch.add(g[:, :, s:], carry[:, :, s:], out=g_prod[:, :s])
                torch.add(g[:, :, : k * s], carry[:, :, : k * s], out=g_prod[:, s:])
        d_stacked.baddbmm_(g_prod, prev.mT)
        if k > 1:
            width = g_prod.shape[-1]
            carry = carry_buf[: hm * s * width].view(hm, s, width)
            torch.bmm(st, g_prod, out=carry)
    return d_stacked
