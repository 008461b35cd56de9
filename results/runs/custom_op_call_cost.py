"""Per-call cost of a custom_op against a torch.library.impl op and a plain call (a 4-float clone)."""
import time, torch
@torch.library.custom_op("tst::ident", mutates_args=())
def ident(x: torch.Tensor) -> torch.Tensor:
    return x.clone()
@ident.register_fake
def _(x): return torch.empty_like(x)
lib = torch.library.Library("tst2", "DEF")
lib.define("ident(Tensor x) -> Tensor")
torch.library.impl("tst2::ident", "CompositeExplicitAutograd", lib=lib)(lambda x: x.clone())
x = torch.randn(4)
for name, f in [("plain", lambda: x.clone()), ("custom_op", lambda: torch.ops.tst.ident.default(x)), ("library.impl", lambda: torch.ops.tst2.ident.default(x))]:
    for _ in range(1000): f()
    t0 = time.perf_counter()
    for _ in range(20000): f()
    print(name, (time.perf_counter() - t0) / 20000 * 1e6, "us")
