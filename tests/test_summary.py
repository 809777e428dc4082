"""Tests of the summary layer: lme4's printed layout, the summary tables, and anova.

The stand-in fits carry the numbers lme4 1.1-31 (R 4.2.2) reports for the models named in
the comments; the expected texts are R's ``print(summary(.))`` output with lme4 >= 1.1-36's
``-2*log(L)`` header (older lme4 prints ``deviance``), the package tag, and the ASCII quotes R
prints in a non-UTF-8 locale. Lines end in ``$`` (as ``cat -A`` shows them) so that trailing
blanks, which R prints, stay visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ngmm_formula.errors import NGMMError
from ngmm_formula.summary import (
    AnovaTable,
    Summary,
    _abbreviate,
    _format_pval,
    _title_lines,
    _zapsmall,
    anova,
    format_anova,
    r_format,
    summarize,
)


def _text(block: str) -> str:
    lines = block.strip("\n").splitlines()
    assert all(line.endswith("$") for line in lines), "every expected line ends in $"
    return "\n".join(line[:-1] for line in lines)


def _family(name: str, link: str) -> Any:
    return SimpleNamespace(name=name, link=SimpleNamespace(name=link))


@dataclass
class StandIn:
    """The attributes of NGMMResult that the summary layer reads."""

    title: str
    reml: bool
    family: Any
    formula: str
    data_name: str | None
    loglik: float
    aic: float
    bic: float
    df_resid: int
    nobs: int
    npar: int
    pearson: np.ndarray
    varcorr: pd.DataFrame
    ngroups: dict[str, int]
    fixef: pd.Series
    vcov: pd.DataFrame
    t_stat: bool
    name: str | None = None
    warnings_text: list[str] = field(default_factory=list)
    nn_terms: list[dict[str, Any]] = field(default_factory=list)
    ml: StandIn | None = None

    @property
    def deviance(self) -> float:
        return -2.0 * self.loglik

    def residuals(self, type: str = "response") -> np.ndarray:
        assert type == "pearson"
        return self.pearson

    def refit_ml(self) -> StandIn:
        assert self.ml is not None
        return self.ml


def _fixef(names: list[str], est: list[float], vcov: list[float]
           ) -> tuple[pd.Series, pd.DataFrame]:
    p = len(names)
    V = np.asarray(vcov, dtype=float).reshape(p, p)
    return pd.Series(est, index=names), pd.DataFrame(V, index=names, columns=names)


LAPLACE = "Generalized linear mixed model fit by maximum likelihood (Laplace Approximation)"
CBPP_FORMULA = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


def cbpp_fit() -> StandIn:
    # R: m1 <- glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial)
    fixef, vcov = _fixef(
        ["(Intercept)", "period2", "period3", "period4"],
        [-1.398342864471145, -0.991924974975739, -1.128216215943340, -1.579745413649192],
        [0.0534599360385409, -0.0254346289308176, -0.0253489138948358, -0.0254102128915789,
         -0.0254346289308176, 0.0919003132857915, 0.0274081035980125, 0.0273133257974532,
         -0.0253489138948358, 0.0274081035980125, 0.1042193078318191, 0.0269551116622413,
         -0.0254102128915789, 0.0273133257974532, 0.0269551116622413, 0.1781254929724605])
    return StandIn(
        title=LAPLACE, reml=False, family=_family("binomial", "logit"),
        formula=CBPP_FORMULA, data_name="cbpp",
        loglik=-92.0265663895303, aic=194.0531327790605, bic=204.1798912327363,
        df_resid=51, nobs=56, npar=5,
        # quantile(residuals(m1, "pearson")): the quantiles of these five are themselves
        pearson=np.array([-2.381635998283459, -0.788935381221341, -0.202627053141524,
                          0.514254129255799, 2.879088060849779]),
        varcorr=pd.DataFrame({"group": ["herd"], "var1": ["(Intercept)"], "var2": [None],
                              "vcov": [0.4122538], "sdcor": [0.6420699]}),
        ngroups={"herd": 15}, fixef=fixef, vcov=vcov, t_stat=False)


def cbpp0_fit() -> StandIn:
    # R: m0 <- glmer(cbind(incidence, size - incidence) ~ 1 + (1 | herd), cbpp, binomial)
    fixef, vcov = _fixef(["(Intercept)"], [-2.04567101229751], [0.0581449759631052])
    return replace(cbpp_fit(), formula="cbind(incidence, size - incidence) ~ 1 + (1 | herd)",
                   loglik=-104.8315351874879, aic=213.6630703749759, bic=217.7137737564462,
                   df_resid=54, npar=2, fixef=fixef, vcov=vcov,
                   varcorr=pd.DataFrame({"group": ["herd"], "var1": ["(Intercept)"],
                                         "var2": [None], "vcov": [0.658888394536523],
                                         "sdcor": [0.81171940628306]}))


SLEEP_SIGMA = 25.5917957216753500


def sleep_fit() -> StandIn:
    # R: m <- lmer(Reaction ~ Days + (Days | Subject), sleepstudy)
    fixef, vcov = _fixef(["(Intercept)", "Days"], [251.405104848485, 10.467285959596],
                         [46.57512004878942, -1.45108841663252,
                          -1.45108841663252, 2.38946562320698])
    # R: quantile(residuals(m, "pearson", scaled = TRUE)); unscaled here, as residuals(m)
    scaled = np.array([-3.9535673453670297, -0.4633976831270658, 0.0231176647794387,
                       0.4634020781502671, 5.1792603734114504])
    return StandIn(
        title="Linear mixed model fit by REML", reml=True, family=_family("gaussian", "identity"),
        formula="Reaction ~ Days + (Days | Subject)", data_name="sleepstudy",
        loglik=-871.8141359799760, aic=1755.6282719599519, bic=1774.7860130652932,
        df_resid=174, nobs=180, npar=6, pearson=scaled * SLEEP_SIGMA,
        varcorr=pd.DataFrame({
            "group": ["Subject", "Subject", "Subject", "Residual"],
            "var1": ["(Intercept)", "Days", "(Intercept)", None],
            "var2": [None, None, "Days", None],
            "vcov": [612.10015802476880, 35.07171445093885, 9.60440895115776,
                     654.94000825996079],
            "sdcor": [24.7406579949840619, 5.9221376588980812, 0.0655512382381282,
                      SLEEP_SIGMA]}),
        ngroups={"Subject": 18}, fixef=fixef, vcov=vcov, t_stat=True,
        # R: logLik(refitML(m)), AIC, BIC; attr(, "df") = 6
        ml=StandIn(
            title="Linear mixed model fit by maximum likelihood", reml=False,
            family=_family("gaussian", "identity"),
            formula="Reaction ~ Days + (Days | Subject)", data_name="sleepstudy",
            loglik=-875.96967223160482, aic=1763.9393444632096, bic=1783.0970855685509,
            df_resid=174, nobs=180, npar=6, pearson=scaled, varcorr=pd.DataFrame(),
            ngroups={"Subject": 18}, fixef=fixef, vcov=vcov, t_stat=True))


def sleep_intercept_fit() -> StandIn:
    # R: mi <- lmer(Reaction ~ Days + (1 | Subject), sleepstudy); refitML(mi)
    f = sleep_fit()
    assert f.ml is not None
    ml = replace(f.ml, formula="Reaction ~ Days + (1 | Subject)", loglik=-897.03932150261301,
                 aic=1802.078643005226, bic=1814.8504704087868, npar=4, df_resid=176)
    return replace(f, formula="Reaction ~ Days + (1 | Subject)", loglik=-893.23254269746053,
                   aic=1794.4650853949211, bic=1807.2369127984819, npar=4, df_resid=176,
                   ml=ml)


def singular_fit() -> StandIn:
    # R: set.seed(1); d <- data.frame(g = factor(rep(1:10, each = 5)), x = rnorm(50))
    #    d$y <- rnorm(50) + d$x; m <- lmer(y ~ x + (x | g), d)
    sigma = 0.96270504325497996
    fixef, vcov = _fixef(["(Intercept)", "x"], [0.12116156554183929, 0.94370674260675425],
                         [0.020290814639224039, -0.0010409178950714596,
                          -0.0010409178950714596, 0.030328120878556925])
    return StandIn(
        title="Linear mixed model fit by REML", reml=True, family=_family("gaussian", "identity"),
        formula="y ~ x + (x | g)", data_name="d", loglik=-70.708941503562428,
        aic=153.41788300712486, bic=164.89002103969372, df_resid=44, nobs=50, npar=6,
        pearson=sigma * np.array([-2.0655594330336262, -0.66025945813591269,
                                  -0.059934231316012901, 0.53597757385381672,
                                  2.275049441358775]),
        varcorr=pd.DataFrame({
            "group": ["g", "g", "g", "Residual"], "var1": ["(Intercept)", "x", "(Intercept)", None],
            "var2": [None, None, "x", None],
            "vcov": [0.01405460271999512, 0.021789282321297947, 0.017499705899804593,
                     0.92680100030857282],
            "sdcor": [0.11855210972393161, 0.14761193150046492, 1.0, sigma]}),
        ngroups={"g": 10}, fixef=fixef, vcov=vcov, t_stat=True,
        warnings_text=["boundary (singular) fit: see help('isSingular')"])


def three_fit() -> StandIn:
    # R: set.seed(2); n <- 400
    #    d2 <- data.frame(g = factor(rep(1:20, each = 20)), h = factor(rep(1:8, length.out = n)),
    #                     x = rnorm(n), z = rnorm(n))
    #    b <- MASS::mvrnorm(20, c(0, 0, 0), matrix(c(1, .5, -.3, .5, 1, .2, -.3, .2, 1), 3))
    #    d2$y <- 1 + 0.5 * d2$x - 0.2 * d2$z + b[d2$g, 1] + b[d2$g, 2] * d2$x +
    #            b[d2$g, 3] * d2$z + rnorm(8)[d2$h] + rnorm(n)
    #    m2 <- lmer(y ~ x + z + (1 + x + z | g) + (1 | h), d2, REML = FALSE)
    sigma = 0.96581017151058668
    fixef, vcov = _fixef(
        ["(Intercept)", "x", "z"],
        [0.90515823440613341, 0.39114527756865858, 0.022621670111591399],
        [0.17706732767613034, 0.028093850799718583, -0.045454581214783678,
         0.028093850799718583, 0.058767550562612632, -0.020505837659535401,
         -0.045454581214783678, -0.020505837659535401, 0.070239117156293551])
    return StandIn(
        title="Linear mixed model fit by maximum likelihood", reml=False,
        family=_family("gaussian", "identity"), formula="y ~ x + z + (1 + x + z | g) + (1 | h)",
        data_name="d2", loglik=-655.7453692228371, aic=1333.4907384456742,
        bic=1377.3968484638619, df_resid=389, nobs=400, npar=11,
        pearson=sigma * np.array([-4.5419778669751016, -0.59948154943055032,
                                  0.011006984118938197, 0.61582248332032163,
                                  2.9077663393259594]),
        varcorr=pd.DataFrame({
            "group": ["g", "g", "g", "g", "g", "g", "h", "Residual"],
            "var1": ["(Intercept)", "x", "z", "(Intercept)", "(Intercept)", "x", "(Intercept)",
                     None],
            "var2": [None, None, None, "x", "z", "z", None, None],
            "vcov": [1.1871431441395792, 1.1195243538451076, 1.3451563947130916,
                     0.56984736964191596, -0.90761649243730869, -0.41259773740462091,
                     0.92004886668627162, 0.93278928739330891],
            "sdcor": [1.089560986883974, 1.0580757788764978, 1.1598087750629806,
                      0.49429956788259632, -0.71823149318753132, -0.33622010466637797,
                      0.95919177784542731, sigma]}),
        ngroups={"g": 20, "h": 8}, fixef=fixef, vcov=vcov, t_stat=True)


# ------------------------------------------------------------------- printed layout vs R
CBPP_TEXT = """
Generalized linear mixed model fit by maximum likelihood (Laplace$
  Approximation) [ngmm_formula]$
 Family: binomial  ( logit )$
Formula: cbind(incidence, size - incidence) ~ period + (1 | herd)$
   Data: cbpp$
$
      AIC       BIC    logLik -2*log(L)  df.resid $
    194.1     204.2     -92.0     184.1        51 $
$
Scaled residuals: $
    Min      1Q  Median      3Q     Max $
-2.3816 -0.7889 -0.2026  0.5142  2.8791 $
$
Random effects:$
 Groups Name        Variance Std.Dev.$
 herd   (Intercept) 0.4123   0.6421  $
Number of obs: 56, groups:  herd, 15$
$
Fixed effects:$
            Estimate Std. Error z value Pr(>|z|)    $
(Intercept)  -1.3983     0.2312  -6.048 1.47e-09 ***$
period2      -0.9919     0.3032  -3.272 0.001068 ** $
period3      -1.1282     0.3228  -3.495 0.000474 ***$
period4      -1.5797     0.4220  -3.743 0.000182 ***$
---$
Signif. codes:  0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1$
$
Correlation of Fixed Effects:$
        (Intr) perid2 perid3$
period2 -0.363              $
period3 -0.340  0.280       $
period4 -0.260  0.213  0.198$
"""

SLEEP_TEXT = """
Linear mixed model fit by REML ['ngmm_formula']$
Formula: Reaction ~ Days + (Days | Subject)$
   Data: sleepstudy$
$
REML criterion at convergence: 1743.6$
$
Scaled residuals: $
    Min      1Q  Median      3Q     Max $
-3.9536 -0.4634  0.0231  0.4634  5.1793 $
$
Random effects:$
 Groups   Name        Variance Std.Dev. Corr$
 Subject  (Intercept) 612.10   24.741       $
          Days         35.07    5.922   0.07$
 Residual             654.94   25.592       $
Number of obs: 180, groups:  Subject, 18$
$
Fixed effects:$
            Estimate Std. Error t value$
(Intercept)  251.405      6.825  36.838$
Days          10.467      1.546   6.771$
$
Correlation of Fixed Effects:$
     (Intr)$
Days -0.138$
"""

# lme4 also prints "optimizer (nloptwrap) convergence code: 0 (OK)" above the message.
SINGULAR_TEXT = """
Linear mixed model fit by REML ['ngmm_formula']$
Formula: y ~ x + (x | g)$
   Data: d$
$
REML criterion at convergence: 141.4$
$
Scaled residuals: $
     Min       1Q   Median       3Q      Max $
-2.06556 -0.66026 -0.05993  0.53598  2.27505 $
$
Random effects:$
 Groups   Name        Variance Std.Dev. Corr$
 g        (Intercept) 0.01405  0.1186       $
          x           0.02179  0.1476   1.00$
 Residual             0.92680  0.9627       $
Number of obs: 50, groups:  g, 10$
$
Fixed effects:$
            Estimate Std. Error t value$
(Intercept)   0.1212     0.1424   0.851$
x             0.9437     0.1741   5.419$
$
Correlation of Fixed Effects:$
  (Intr)$
x -0.042$
boundary (singular) fit: see help('isSingular')$
"""

THREE_TEXT = """
Linear mixed model fit by maximum likelihood ['ngmm_formula']$
Formula: y ~ x + z + (1 + x + z | g) + (1 | h)$
   Data: d2$
$
      AIC       BIC    logLik -2*log(L)  df.resid $
   1333.5    1377.4    -655.7    1311.5       389 $
$
Scaled residuals: $
    Min      1Q  Median      3Q     Max $
-4.5420 -0.5995  0.0110  0.6158  2.9078 $
$
Random effects:$
 Groups   Name        Variance Std.Dev. Corr       $
 g        (Intercept) 1.1871   1.0896              $
          x           1.1195   1.0581    0.49      $
          z           1.3452   1.1598   -0.72 -0.34$
 h        (Intercept) 0.9200   0.9592              $
 Residual             0.9328   0.9658              $
Number of obs: 400, groups:  g, 20; h, 8$
$
Fixed effects:$
            Estimate Std. Error t value$
(Intercept)  0.90516    0.42079   2.151$
x            0.39115    0.24242   1.614$
z            0.02262    0.26503   0.085$
$
Correlation of Fixed Effects:$
  (Intr) x     $
x  0.275       $
z -0.408 -0.319$
"""


@pytest.mark.parametrize("make, expected", [
    (cbpp_fit, CBPP_TEXT),      # R: print(summary(m1))  (glmer, Laplace)
    (sleep_fit, SLEEP_TEXT),    # R: print(summary(m))   (lmer, REML, correlated term)
    (singular_fit, SINGULAR_TEXT),  # R: print(summary(m)), singular fit
    (three_fit, THREE_TEXT),    # R: print(summary(m2))  (ML, 3x3 correlations, two factors)
])
def test_summary_text_matches_lme4_line_by_line(make: Any, expected: str) -> None:
    got = str(summarize(make())).splitlines()
    want = _text(expected).splitlines()
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"line {i + 1}:\n got: {g!r}\nwant: {w!r}"
    assert len(got) == len(want)


def test_summary_repr_is_the_text() -> None:
    s = summarize(cbpp_fit())
    assert repr(s) == str(s) == s.to_string()


def test_title_one_line_or_wrapped_as_lme4() -> None:
    # lme4's .prt.methTit: "title ['class']" when it fits in the width, otherwise wrapped
    assert _title_lines("Linear mixed model fit by REML", "ngmm_formula", 80) == [
        "Linear mixed model fit by REML ['ngmm_formula']"]
    # R: print(summary(glmer(..., nAGQ = 5))) prints
    #   Generalized linear mixed model fit by maximum likelihood (Adaptive
    #     Gauss-Hermite Quadrature, nAGQ = 5) [glmerMod]
    title = ("Generalized linear mixed model fit by maximum likelihood (Adaptive Gauss-Hermite "
             "Quadrature, nAGQ = 5)")
    assert _title_lines(title, "glmerMod", 80) == [
        "Generalized linear mixed model fit by maximum likelihood (Adaptive",
        "  Gauss-Hermite Quadrature, nAGQ = 5) [glmerMod]"]
    assert summarize(cbpp_fit()).to_string(width=200).splitlines()[0] == (
        LAPLACE + " ['ngmm_formula']")


# ---------------------------------------------------------------------- the tables (numbers)
def test_summary_tables_cbpp() -> None:
    s = summarize(cbpp_fit())
    assert isinstance(s, Summary)
    assert s.header == (" Family: binomial  ( logit )", f"Formula: {CBPP_FORMULA}",
                        "   Data: cbpp")
    assert list(s.fit_stats.index) == ["AIC", "BIC", "logLik", "-2*log(L)", "df.resid"]
    assert s.fit_stats["-2*log(L)"] == pytest.approx(184.0531327790605, rel=1e-12)
    assert list(s.fixed_effects.columns) == ["Estimate", "Std. Error", "z value", "Pr(>|z|)"]
    # R: coef(summary(m1)); printed p-values 1.47e-09, 0.001068, 0.000474, 0.000182 are the
    # normal tail of the same z, so agreement to the printed digits is exact arithmetic
    np.testing.assert_allclose(s.fixed_effects["Pr(>|z|)"],
                               [1.47e-09, 0.001068, 0.000474, 0.000182], rtol=5e-3)
    np.testing.assert_allclose(s.fixed_effects["z value"],
                               [-6.048, -3.272, -3.495, -3.743], atol=5e-4)
    assert s.random_effects.to_dict("list") == {
        "Groups": ["herd"], "Name": ["(Intercept)"], "Variance": [0.4122538],
        "Std.Dev.": [0.6420699]}
    assert s.random_effects_blocks == (1,)
    assert s.correlation.shape == (4, 4)
    assert s.correlation.loc["period2", "(Intercept)"] == pytest.approx(-0.363, abs=5e-4)
    assert s.show_correlation
    assert s.neural_terms is None and s.notes == () and s.warnings == ()


def test_summary_tables_sleepstudy() -> None:
    s = summarize(sleep_fit())
    assert s.header == ("Formula: Reaction ~ Days + (Days | Subject)", "   Data: sleepstudy")
    # R: REMLcrit(m) = 1743.6282719599519
    assert s.fit_stats.to_dict() == {"REML": pytest.approx(1743.6282719599519, rel=1e-12)}
    assert list(s.fixed_effects.columns) == ["Estimate", "Std. Error", "t value"]
    re = s.random_effects
    assert list(re.columns) == ["Groups", "Name", "Variance", "Std.Dev.", "Corr.1"]
    assert list(re["Groups"]) == ["Subject", "Subject", "Residual"]
    assert re.loc[1, "Corr.1"] == pytest.approx(0.0655512382381282)
    assert math.isnan(re.loc[0, "Corr.1"]) and math.isnan(re.loc[2, "Corr.1"])
    assert s.random_effects_blocks == (2, 1)
    # scaled residuals: Pearson residuals / sigma (sigma from the Residual row)
    np.testing.assert_allclose(s.residual_quantiles,
                               [-3.9535673453670297, -0.4633976831270658, 0.0231176647794387,
                                0.4634020781502671, 5.1792603734114504], rtol=1e-12)


def test_diagonal_terms_are_separate_blocks() -> None:
    # R: lmer(Reaction ~ Days + (Days || Subject), sleepstudy): two blocks without Corr
    f = sleep_fit()
    f.varcorr = pd.DataFrame({"group": ["Subject", "Subject", "Residual"],
                              "var1": ["(Intercept)", "Days", None], "var2": [None, None, None],
                              "vcov": [627.56905, 35.85838, 653.58350],
                              "sdcor": [25.051328, 5.988187, 25.565279]})
    s = summarize(f)
    assert s.random_effects_blocks == (1, 1, 1)
    assert list(s.random_effects.columns) == ["Groups", "Name", "Variance", "Std.Dev."]
    lines = str(s).splitlines()
    i = lines.index("Random effects:")
    assert lines[i + 1:i + 5] == [" Groups   Name        Variance Std.Dev.",
                                  " Subject  (Intercept) 627.57   25.051  ",
                                  " Subject  Days         35.86    5.988  ",
                                  " Residual             653.58   25.565  "]


def test_correlation_hidden_above_twelve_coefficients() -> None:
    f = cbpp_fit()
    names = [f"x{i}" for i in range(13)]
    f.fixef = pd.Series(np.linspace(-1, 1, 13), index=names)
    f.vcov = pd.DataFrame(np.eye(13) * 0.01, index=names, columns=names)
    s = summarize(f)
    assert not s.show_correlation
    text = str(s)
    assert "Correlation of Fixed Effects:" not in text
    assert "Correlation matrix not shown by default, as p = 13 > 12." in text
    assert "Correlation of Fixed Effects:" in str(summarize(f, correlation=True))
    assert "Correlation" not in str(summarize(cbpp_fit(), correlation=False))


def test_neural_terms_block_and_warnings() -> None:
    f = three_fit()
    f.nn_terms = [{"label": "nn(x, w)", "inputs": ["x", "w"],
                   "architecture": "MLP(2-32-32-1, relu)", "n_weights": 1153,
                   "variance_share": 0.21345}]
    f.warnings_text = ["Model failed to converge with max|grad| = 0.0123 (tol = 0.002)"]
    s = summarize(f)
    assert s.neural_terms is not None
    assert list(s.neural_terms.columns) == ["Term", "Inputs", "Architecture", "Weights",
                                            "Networks", "Share of var(eta)"]
    lines = str(s).splitlines()
    i = lines.index("Neural terms:")
    assert lines[i - 1] == ""
    assert lines[i + 1:] == [
        " Term     Architecture         Weights Var share",
        " nn(x, w) MLP(2-32-32-1, relu)   1,153     0.213",
        "Var share: the term's share of var(eta), the variance of the linear predictor",
        "  on the training data.",
        "Note: x enters nn(x, w) and the linear part; its linear coefficient is not",
        "  interpretable on its own.",
        "Model failed to converge with max|grad| = 0.0123 (tol = 0.002)",
    ]
    # the weights are counted apart from the statistical parameters, and df.resid never
    # goes negative (npar = 6 here, of which 1153 weights cannot be)
    f.npar, f.df_resid = 6 + 1153, 400 - 6 - 1153
    s = summarize(f)
    assert s.npar == 1159 and s.network_weights == 1153
    assert s.fit_stats["df.resid"] == 394
    text = str(s)
    assert "\nnpar = 6 + 1,153 network weights: AIC, BIC count all; df.resid = nobs - 6\n" \
        in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_neural_terms_block_never_wraps() -> None:
    f = three_fit()
    f.npar = 6 + 2 * 8577
    long = "nn(age, livch, urban, children, education, income, region, hidden=(64, 64))"
    f.nn_terms = [{"label": long, "inputs": "age, livch", "architecture":
                   "12 -> 64 -> 64 -> 1 (relu) + linear", "n_weights": 8577,
                   "variance_share": 0.153},
                  {"label": "nn(x)", "inputs": "x", "architecture":
                   "1 -> 64 -> 64 -> 1 (relu) + linear", "n_weights": 8577,
                   "variance_share": 0.021}]
    text = str(summarize(f))
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "8,577 weights; var share 0.153" in text and "17,154 network weights" in text


def test_no_family_line_only_for_gaussian_identity() -> None:
    f = sleep_fit()
    f.family = _family("gaussian", "log")
    assert summarize(f).header[0] == " Family: gaussian  ( log )"


# ------------------------------------------------------------------------------------ anova
ANOVA_TEXT = """
Data: cbpp$
Models:$
m0: cbind(incidence, size - incidence) ~ 1 + (1 | herd)$
m1: cbind(incidence, size - incidence) ~ period + (1 | herd)$
   npar    AIC    BIC   logLik -2*log(L) Chisq Df Pr(>Chisq)    $
m0    2 213.66 217.71 -104.832    209.66                        $
m1    5 194.05 204.18  -92.027    184.05 25.61  3  1.151e-05 ***$
---$
Signif. codes:  0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1$
"""


def test_anova_cbpp_numbers_and_text() -> None:
    # R: anova(m0, m1) with m0 = glmer(... ~ 1 + (1 | herd)), m1 = glmer(... ~ period + ...)
    m0, m1 = cbpp0_fit(), cbpp_fit()
    m0.name, m1.name = "m0", "m1"
    tab = anova(m1, m0)  # given in any order, sorted by npar
    assert isinstance(tab, AnovaTable) and isinstance(tab, pd.DataFrame)
    assert list(tab.index) == ["m0", "m1"]
    assert list(tab.columns) == ["npar", "AIC", "BIC", "logLik", "-2*log(L)", "Chisq", "Df",
                                 "Pr(>Chisq)"]
    assert list(tab["npar"]) == [2, 5]
    # the table is arithmetic on the inputs: R's values to 1e-10
    np.testing.assert_allclose(tab["AIC"], [213.663070374976, 194.053132779061], rtol=1e-10)
    np.testing.assert_allclose(tab["-2*log(L)"], [209.663070374976, 184.053132779061],
                               rtol=1e-10)
    assert math.isnan(tab["Chisq"].iloc[0]) and math.isnan(tab["Pr(>Chisq)"].iloc[0])
    assert tab["Chisq"].iloc[1] == pytest.approx(25.6099375959153, rel=1e-10)
    assert tab["Df"].iloc[1] == 3
    assert tab["Pr(>Chisq)"].iloc[1] == pytest.approx(1.15100648909655e-05, rel=1e-8)
    assert str(tab) == repr(tab) == format_anova(tab) == _text(ANOVA_TEXT)
    # slices are plain DataFrames
    assert type(tab[["AIC"]]) is pd.DataFrame


def test_anova_default_names_by_position() -> None:
    tab = anova(cbpp_fit(), cbpp0_fit())
    assert list(tab.index) == ["m2", "m1"]
    assert tab.attrs["heading"][2] == "m2: cbind(incidence, size - incidence) ~ 1 + (1 | herd)"
    tab = anova(cbpp0_fit(), cbpp_fit(), model_names=["small", "big"])
    assert list(tab.index) == ["small", "big"]


def test_anova_keyword_names() -> None:
    # R: anova(m0, m1) names the rows by the variables; in Python: anova(m0=..., m1=...)
    import ngmm_formula

    for fn in (anova, ngmm_formula.anova):
        tab = fn(m1=cbpp_fit(), m0=cbpp0_fit())
        assert list(tab.index) == ["m0", "m1"]
        assert tab.attrs["heading"][2:] == [
            "m0: cbind(incidence, size - incidence) ~ 1 + (1 | herd)",
            "m1: cbind(incidence, size - incidence) ~ period + (1 | herd)"]
        assert str(tab) == _text(ANOVA_TEXT)
    # positional and keyword together: positional ones by name or position
    tab = anova(cbpp0_fit(), full=cbpp_fit())
    assert list(tab.index) == ["m1", "full"]


def test_anova_short_formulas_name_the_rows() -> None:
    small, big = cbpp0_fit(), cbpp_fit()
    small.formula, big.formula = "y ~ 1 + (1 | g)", "y ~ x + (1 | g)"
    small.data_name = big.data_name = None
    tab = anova(big, small)
    assert list(tab.index) == ["y ~ 1 + (1 | g)", "y ~ x + (1 | g)"]
    assert tab.attrs["heading"] == ["Models:", "y ~ 1 + (1 | g)", "y ~ x + (1 | g)"]
    assert max(len(line) for line in str(tab).splitlines()) <= 80


# R: print(anova(mi, m)), lme4 >= 1.1-36 header
SLEEP_ANOVA_TEXT = """
Data: sleepstudy$
Models:$
mi: Reaction ~ Days + (1 | Subject)$
m: Reaction ~ Days + (Days | Subject)$
   npar    AIC    BIC  logLik -2*log(L)  Chisq Df Pr(>Chisq)    $
mi    4 1802.1 1814.8 -897.04    1794.1                         $
m     6 1763.9 1783.1 -875.97    1751.9 42.139  2  7.072e-10 ***$
---$
Signif. codes:  0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1$
"""


def test_anova_refits_reml_fits_by_ml(capsys: pytest.CaptureFixture[str]) -> None:
    # R: anova(mi, m) with mi = lmer(Reaction ~ Days + (1 | Subject)), m = lmer(... (Days | ...))
    #    "refitting model(s) with ML (instead of REML)"
    tab = anova(sleep_intercept_fit(), sleep_fit())
    assert "refitting model(s) with ML (instead of REML)" in capsys.readouterr().err
    np.testing.assert_allclose(tab["logLik"], [-897.03932150261301, -875.96967223160482],
                               rtol=1e-12)
    np.testing.assert_allclose(tab["AIC"], [1802.078643005226, 1763.9393444632096], rtol=1e-12)
    assert tab["Chisq"].iloc[1] == pytest.approx(42.139298542016377, rel=1e-10)
    assert tab["Pr(>Chisq)"].iloc[1] == pytest.approx(7.0724125472300269e-10, rel=1e-8)
    tab = anova(sleep_intercept_fit(), sleep_fit(), model_names=["mi", "m"])
    assert str(tab) == _text(SLEEP_ANOVA_TEXT)
    # ML fits are used as they are, silently
    capsys.readouterr()
    anova(cbpp0_fit(), cbpp_fit())
    assert capsys.readouterr().err == ""


def test_anova_equal_npar_gives_no_test() -> None:
    a, b = cbpp_fit(), cbpp_fit()
    b.loglik -= 1.0
    tab = anova(a, b)
    assert tab["Df"].iloc[1] == 0 and math.isnan(tab["Pr(>Chisq)"].iloc[1])
    assert tab["Chisq"].iloc[1] == 0.0  # 2 * max(0, diff), as lme4


@pytest.mark.parametrize("change, message", [
    ({"nobs": 50}, "same size of dataset"),
    ({"formula": "cbind(size, incidence) ~ period + (1 | herd)"}, "different responses"),
    ({"data_name": "cbpp2"}, "same data"),
])
def test_anova_rejects_fits_on_different_data(change: dict[str, Any], message: str) -> None:
    other = replace(cbpp0_fit(), **change)
    with pytest.raises(NGMMError, match=message):
        anova(other, cbpp_fit())


def test_anova_needs_two_fits() -> None:
    with pytest.raises(NGMMError, match="at least two"):
        anova(cbpp_fit())
    with pytest.raises(NGMMError, match="at least two"):
        anova()


# --------------------------------------------------------- R's formatting helpers, by table
FORMAT_CASES = [
    # (x, digits, nsmall, R: format(x, digits = digits, nsmall = nsmall))
    ([612.1001580247688, 35.071714450938849, 654.94000825996079], 4, 0,
     ["612.10", " 35.07", "654.94"]),
    ([24.740657994984062, 5.9221376588980812, 25.59179572167535], 4, 0,
     ["24.741", " 5.922", "25.592"]),
    ([1.47e-09], 3, 0, ["1.47e-09"]),
    ([0.001068, 0.000474, 0.000182], 3, 0, ["0.001068", "0.000474", "0.000182"]),
    ([194.1, 204.2, -92.0, 184.1, 51], 7, 0, ["194.1", "204.2", "-92.0", "184.1", " 51.0"]),
    ([1e-10, 1, 1000], 4, 0, ["1e-10", "1e+00", "1e+03"]),
    ([123456789, 1], 7, 0, ["123456789", "        1"]),
    ([9996], 3, 0, ["9996"]),
    ([0.99996], 4, 0, ["1"]),
    ([0, 1.5, math.nan], 4, 0, ["0.0", "1.5", " NA"]),
    ([1, 0.07, 0.0655, 1], 7, 2, ["1.0000", "0.0700", "0.0655", "1.0000"]),
    ([100000, 200000], 7, 0, ["1e+05", "2e+05"]),
    ([123456.7], 7, 0, ["123456.7"]),
    ([3.14159e-05, 2.5], 4, 0, ["3.142e-05", "2.500e+00"]),
    ([-0.000123], 4, 0, ["-0.000123"]),
    ([2.220446e-16], 1, 0, ["2e-16"]),
    ([1e100, 1], 4, 0, ["1e+100", " 1e+00"]),
]


@pytest.mark.parametrize("x, digits, nsmall, expected", FORMAT_CASES)
def test_r_format(x: list[float], digits: int, nsmall: int, expected: list[str]) -> None:
    assert r_format(x, digits, nsmall) == expected


@pytest.mark.parametrize("pv, digits, expected", [
    # R: format.pval(pv, digits = digits)
    ([1.47e-09, 0.001068, 0.000474, 0.000182], 3,
     ["1.47e-09", "0.001068", "0.000474", "0.000182"]),
    ([1e-20, 0.5], 3, ["<2e-16", "0.5"]),
    ([1e-20], 3, ["<2e-16"]),
    ([0.0500001, 0.2, 0.9], 4, ["0.05", "0.20", "0.90"]),
    ([1e-20, 0.01234], 4, ["< 2e-16", "0.01234"]),
])
def test_format_pval(pv: list[float], digits: int, expected: list[str]) -> None:
    assert _format_pval(pv, digits) == expected


ABBREVIATE_NAMES = ["(Intercept)", "period2", "Days", "x:treatmentB", "log(age)", "poly(x, 2)1",
                    "poly(x, 2)2", "I(x^2)", "sexMale", "sexMale:age", "urban[T.Y]",
                    "aaaaaaaaaaaaaa1", "aaaaaaaaaaaaaa2", "age_centered:children",
                    "C(period)[T.2]", "I(Days^2)", "Days:treatment[T.b]", "AGE", "ABCDEFGHIJ",
                    "a b c d e f g h"]


@pytest.mark.parametrize("minlength, expected", [
    # R: abbreviate(ABBREVIATE_NAMES, minlength)
    (6, ["(Intr)", "perid2", "Days", "x:trtB", "log(g)", "p(,2)1", "p(,2)2", "I(x^2)", "sexMal",
         "sxMl:g", "u[T.Y]", "aaaaa1", "aaaaa2", "ag_cn:", "C()[T.", "I(D^2)", "D:[T.]", "AGE",
         "ABCDEF", "abcdefgh"]),
    (11, ["(Intercept)", "period2", "Days", "x:treatmntB", "log(age)", "poly(x, 2)1",
          "poly(x, 2)2", "I(x^2)", "sexMale", "sexMale:age", "urban[T.Y]", "aaaaaaaaaa1",
          "aaaaaaaaaa2", "ag_cntrd:ch", "C(prd)[T.2]", "I(Days^2)", "Dys:trt[T.]", "AGE",
          "ABCDEFGHIJ", "abcdefgh"]),
])
def test_abbreviate(minlength: int, expected: list[str]) -> None:
    assert _abbreviate(ABBREVIATE_NAMES, minlength) == expected


def test_zapsmall() -> None:
    # R 4.2: zapsmall(c(-101.1789, -11.85918, 0.5916226, 11.85929, 132.5466), 5)
    x = [-101.17888787451932, -11.859178844485513, 0.5916225545975635, 11.859291321021473,
         132.54657346571383]
    assert list(_zapsmall(np.array(x), 5)) == [-101.179, -11.859, 0.592, 11.859, 132.547]
