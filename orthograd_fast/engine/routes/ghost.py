"""The ghost route: one dense factored use, token Grams A A^T and D D^T first, in float64
(docs/math.md section 3); b may come from og.forget()'s factors instead of a GEMM (section 4)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..factors import CHUNK_BYTES, OuterFactors
from ..route import GHOST
from .base import Route


# token Grams up to this size run beside other terms, on one intra-op thread (their GEMMs are too
# small to gain from two: MobileNetV2's last 1 x 1 convolutions, B T = 128)
SPREAD_BYTES = 8 << 20


class GhostRoute(Route):
    """sum over tokens of (A A^T) * (D D^T), in blocks of samples; a one-token use (an MLP layer)
    is two B x B products, whose D D^T its bias may share (``shared_bias``)."""

    name = GHOST

    def __init__(self, param: Tensor, B: int, use: OuterFactors):
        super().__init__(param, B)
        self.use = use
        self._r64: Optional[Tuple[Tensor, Tensor]] = None  # float64 rows of a one-token use

    def _one_token(self) -> bool:
        return self.use.a_shape[1] == 1 and self.use.a_shape[2] == 1

    def work(self, unlearn_coef: bool = False) -> int:
        B, (_, T, G, I), O = self.B, self.use.a_shape, self.use.shape[1]
        return 2 * B * B * T * T * G * (I + O) + (0 if unlearn_coef else 2 * B * T * G * O * I)

    def update_work(self) -> int:
        return self.use.a_shape[1] * self.B * self.numel

    def spreadable(self) -> bool:
        """One token per sample: B x B products; more tokens: their float64 token Grams (two
        G x BT x BT) if under SPREAD_BYTES (a late convolution's few positions), else they work in
        CHUNK_BYTES blocks, alone."""
        B, T, G, _ = self.use.a_shape
        return self._one_token() or 2 * G * (B * T) ** 2 * 8 <= SPREAD_BYTES

    def gram_coef(self, U: Tensor, b: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``b`` known (:meth:`unlearn_coef`): only K is formed."""
        if b is None:
            return super().gram_coef(U)
        if self.K is None:
            self.K = self._gram()
        self._r64 = None  # the Gram is kept; its float64 rows are not needed again
        return self.K, b

    def _gram_coef(self, U: Tensor) -> Tuple[Tensor, Tensor]:
        K, b = self._gram(), self.use.coef(U)
        self._r64 = None
        return K, b

    def coef(self, U: Tensor) -> Tensor:
        return self.use.coef(U)

    def apply_(self, U: Tensor, c: Tensor, scale: float = 1.0) -> None:
        self.use.apply_(U, c, scale)

    def _rows64(self) -> Tuple[Tensor, Tensor]:
        """A [B, I] and D [B, O] in float64 of a one-token use (T = G = 1), converted once for the
        Gram and the og.forget() coefficients (D: the bias's float64 rows when it rides along)."""
        if self._r64 is None:
            B = self.B
            D = self.shared_bias.G if self.shared_bias is not None else self.use.D.reshape(B, -1).double()
            self._r64 = (self.use.A.reshape(B, -1).double(), D)
        return self._r64

    def _gram(self) -> Tensor:
        """sum over tokens of (A A^T) * (D D^T), float64, in blocks of samples."""
        use = self.use
        B, T, G, I = use.A.shape
        if T == 1 and G == 1:  # one token per sample (an MLP layer): two B x B products
            A, D = self._rows64()
            DD = D @ D.t()
            if self.shared_bias is not None:  # the bias's Gram: the same D D^T
                self.shared_bias.K = DD
            return (A @ A.t()) * DD
        A = use.A.permute(2, 0, 1, 3).reshape(G, B * T, -1).double()
        D = use.D.permute(2, 0, 1, 3).reshape(G, B * T, -1).double()
        K = torch.zeros(B, B, dtype=torch.float64, device=A.device)
        step = max(1, CHUNK_BYTES // max(1, 2 * G * T * B * T * 8))
        for b0 in range(0, B, step):
            b1 = min(B, b0 + step)
            rows = slice(b0 * T, b1 * T)
            prod = (A[:, rows] @ A.transpose(1, 2)) * (D[:, rows] @ D.transpose(1, 2))
            K[b0:b1] = prod.sum(0).reshape(b1 - b0, T, B, T).sum(dim=(1, 3))
        return K

    # --- coefficients from the unlearn pass's factors (og.forget()) ------------------------------
    def unlearn_coef_cheaper(self, fuses: List[OuterFactors]) -> bool:
        """Whether b_i = <g_i, u> is cheaper from the unlearn factors (u = sum_k D_uk^T A_uk) than
        from the GEMM D U: B T Bu Tu G (I + O) against B T G O I multiply-adds (T = 1 layers of an
        MLP or a classifier head: B_u (I + O) against O I)."""
        if not fuses:
            return False
        use = self.use
        if any(f.ids is not None or f.shape != use.shape or f.transposed != use.transposed for f in fuses):
            return False
        B, T, G, I = use.A.shape
        O = use.shape[1]
        tu = sum(f.A.shape[0] * f.A.shape[1] for f in fuses)
        return tu * (I + O) < O * I

    def unlearn_coef(self, fuses: List[OuterFactors]) -> Tensor:
        """b_i = sum_k sum_{t,s} (a_it . a_ks)(d_it . d_ks) over the unlearn factors, fp64 [B]."""
        use = self.use
        B, T, G, I = use.A.shape
        dt = torch.float64  # like OuterFactors.coef: b must be as exact as K (B x B_u products: cheap)
        if T == 1 and G == 1 and all(f.A.shape[1] == 1 for f in fuses):  # plain B x B_u products
            A, D = self._rows64()
            b = torch.zeros(B, dtype=torch.float64, device=A.device)
            for f in fuses:
                Bu = f.A.shape[0]
                prod = (A @ f.A.reshape(Bu, I).to(dt).t()) * (D @ f.D.reshape(Bu, -1).to(dt).t())
                b += prod.sum(1).double()
            return b
        A = use.A.permute(2, 0, 1, 3).reshape(G, B * T, I).to(dt)
        D = use.D.permute(2, 0, 1, 3).reshape(G, B * T, -1).to(dt)
        b = torch.zeros(B, dtype=torch.float64, device=A.device)
        for f in fuses:
            Bu, Tu = f.A.shape[:2]
            Au = f.A.permute(2, 0, 1, 3).reshape(G, Bu * Tu, I).to(dt)
            Du = f.D.permute(2, 0, 1, 3).reshape(G, Bu * Tu, -1).to(dt)
            step = max(1, CHUNK_BYTES // max(1, 2 * G * T * Bu * Tu * A.element_size()))
            for b0 in range(0, B, step):
                b1 = min(B, b0 + step)
                r = slice(b0 * T, b1 * T)
                prod = (A[:, r] @ Au.transpose(1, 2)) * (D[:, r] @ Du.transpose(1, 2))
                b[b0:b1] += prod.sum(dim=(0, 2)).double().reshape(b1 - b0, T).sum(1)
        return b

