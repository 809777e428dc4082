#!/usr/bin/env Rscript
## ---------------------------------------------------------------------------
## make_refs.R -- reference values from R's lme4 and glmmTMB for the
## ngmm_formula test suite.
##
## Regenerate (from the repository root):
##
##   apt-get install -y r-cran-lme4 r-cran-glmmtmb r-cran-mlmrev r-cran-jsonlite
##   Rscript tests/reference/make_refs.R
##
## Writes, next to this script:
##   lme4_refs.json  -- "meta", "structure" (Part A) and "fits" (Part B)
##   gamma_sim.csv   -- the simulated Gamma data set used by the gamma_* fits
##
## CI never runs R: this script and its output are both committed, and the
## Python tests only read the JSON / CSV.  See README.md for the JSON layout.
##
## Conventions used throughout
##   * Data frames are used exactly as shipped with lme4 / mlmRev (same row
##     order); the Python package bundles the same data frames.
##   * Every index written to the JSON is 0-based EXCEPT `Lind` and
##     `flist_assign`, which are kept 1-based exactly as lme4 stores them
##     (they index R vectors); the README repeats this.
##   * Named numeric vectors are written as JSON objects {name: value} (key
##     order = R order); matrices as {"rownames", "colnames", "data"} with
##     `data` a list of rows; data frames as a list of records; NA -> null.
##   * jsonlite writes at most 15 significant digits (digits = NA), i.e. a
##     relative rounding error <= 5e-15, far below every test tolerance.
## ---------------------------------------------------------------------------

suppressPackageStartupMessages({
  library(Matrix)
  library(lme4)
  library(glmmTMB)
  library(mlmRev)
  library(jsonlite)
})

## Directory of this script (works with `Rscript path/to/make_refs.R`).
script_dir <- local({
  a <- commandArgs(trailingOnly = FALSE)
  f <- sub("^--file=", "", a[grep("^--file=", a)])
  if (length(f)) dirname(normalizePath(f)) else getwd()
})
out_json <- file.path(script_dir, "lme4_refs.json")
out_csv  <- file.path(script_dir, "gamma_sim.csv")

## Data frames, loaded explicitly so that the objects are plain globals
## (update(fit, devFunOnly = TRUE) re-evaluates the call in this scope).
data("cbpp", "sleepstudy", "grouseticks", "VerbAgg", "Pastes",
     "Penicillin", "Dyestuff", package = "lme4", envir = globalenv())
data("Contraception", package = "mlmRev", envir = globalenv())

## Optimiser settings: bobyqa with a large evaluation budget and a tight
## final trust-region radius so that the references are well converged.
## tolPwrss = 1e-12: lme4's default inner (PIRLS) tolerance 1e-7 leaves the
## conditional modes inexact enough to shift the Laplace deviance by ~5e-4
## (cbpp: 184.053133 with the default vs 184.052564 with 1e-12, which agrees
## with glmmTMB and with an independent Laplace computation to ~1e-8).
lctrl <- lmerControl(optimizer = "bobyqa",
                     optCtrl = list(maxfun = 1e5, rhoend = 1e-10))
gctrl <- glmerControl(optimizer = "bobyqa",
                      optCtrl = list(maxfun = 1e5, rhoend = 1e-10),
                      tolPwrss = 1e-12)
## glmer.nb is fragile here: with gctrl, with bobyqa + maxfun = 1e5, and with
## tolPwrss = 1e-12 alone it stops with "Downdated VtV is not positive
## definite" / "pwrssUpdate did not converge"; plain bobyqa reaches a worse
## optimum (logLik -889.97240).  It is therefore run with lme4's default
## control (Nelder_Mead then bobyqa; logLik -889.97202, same as nloptwrap).
tctrl <- glmmTMBControl(optCtrl = list(iter.max = 1e4, eval.max = 1e4))

## ranef (conditional modes + variances) is
## written only for grouping factors with at most this many levels.
RANEF_MAX_LEVELS <- 200L

## ===========================================================================
## Small helpers for turning R objects into JSON-friendly lists
## ===========================================================================

## vector that must stay a JSON array even when it has length 0 or 1
## (auto_unbox would otherwise turn c("x") into "x")
arr <- function(x) I(if (is.null(x)) character(0) else unname(x))

## named numeric vector -> named list (JSON object, R order kept)
nlist <- function(v) {
  v <- unlist(v)
  if (is.null(v)) return(NULL)
  out <- as.list(as.numeric(v))
  names(out) <- names(v)
  out
}

## matrix -> {rownames, colnames, data = rows}
mat_json <- function(m) {
  m <- as.matrix(m)
  list(rownames = arr(rownames(m)), colnames = arr(colnames(m)),
       data = lapply(seq_len(nrow(m)), function(i) arr(as.numeric(m[i, ]))))
}

## data frame -> list of records (factors become strings, NA -> null)
df_records <- function(d) {
  d <- as.data.frame(d, stringsAsFactors = FALSE)
  rownames(d) <- NULL
  for (nm in names(d)) if (is.factor(d[[nm]])) d[[nm]] <- as.character(d[[nm]])
  lapply(seq_len(nrow(d)), function(i) {
    r <- lapply(d[i, , drop = FALSE], function(z) if (is.na(z)) NA else z)
    r
  })
}

## confidence-interval matrix -> list of {name, lower, upper[, estimate]}
ci_records <- function(ci) {
  if (is.null(ci)) return(NULL)
  ci <- as.matrix(ci)
  lapply(seq_len(nrow(ci)), function(i) {
    r <- list(name = rownames(ci)[i], lower = unname(ci[i, 1]),
              upper = unname(ci[i, 2]))
    if (ncol(ci) >= 3) r$estimate <- unname(ci[i, 3])
    r
  })
}

## getME-style theta names built from cnms: for a term with grouping factor g
## and columns nm[1..k], the lower-triangular Cholesky entries in
## column-major order, "g.nm[i]" on the diagonal and "g.nm[i].nm[j]" (row i,
## column j, i > j) below it.  E.g. (Days | Subject) ->
## Subject.(Intercept), Subject.Days.(Intercept), Subject.Days
theta_names <- function(cnms) {
  unlist(mapply(function(g, nm) {
    k <- length(nm); out <- character()
    for (j in seq_len(k)) for (i in j:k)
      out <- c(out, if (i == j) paste(g, nm[i], sep = ".")
                    else paste(g, nm[i], nm[j], sep = "."))
    out
  }, names(cnms), cnms, SIMPLIFY = FALSE), use.names = FALSE)
}

## sparse matrix -> {dim, i, j, x}, 0-based, sorted by column then row
sparse_json <- function(M) {
  T <- as(as(M, "CsparseMatrix"), "TsparseMatrix")
  o <- order(T@j, T@i)
  list(dim = arr(dim(M)), i = arr(T@i[o]), j = arr(T@j[o]), x = arr(T@x[o]))
}

## Run `expr` (a quoted call) in the global environment, collecting warnings
## and messages instead of printing them.
capture <- function(expr, envir = globalenv()) {
  w <- character(); m <- character()
  val <- withCallingHandlers(
    eval(expr, envir = envir),
    warning = function(cw) { w <<- c(w, conditionMessage(cw))
                             invokeRestart("muffleWarning") },
    message = function(cm) { m <<- c(m, trimws(conditionMessage(cm)))
                             invokeRestart("muffleMessage") })
  list(value = val, warnings = unique(w), messages = unique(m))
}

## Fit `expr` and time it: elapsed seconds of one run; if that run is fast
## (< 5 s) the fit is repeated twice more and the median of 3 is reported.
timed_fit <- function(expr) {
  t1 <- system.time(res <- capture(expr))[["elapsed"]]
  times <- t1
  if (t1 < 5) for (r in 1:2)
    times <- c(times, system.time(capture(expr))[["elapsed"]])
  res$time_sec <- median(times)
  res$time_runs <- times
  res
}

call_string <- function(expr) paste(deparse(expr, width.cutoff = 500L), collapse = " ")
formula_string <- function(expr) paste(deparse(expr[[2]], width.cutoff = 500L), collapse = "")

## perturbation used for the objective-at-fixed-parameters tests:
## lme4 theta: entries with lower bound 0 (diagonal of the relative Cholesky
## factor) -> 0.8 * theta + 0.05; unbounded (off-diagonal) -> 0.8 * theta.
perturb_theta <- function(theta, lower) ifelse(lower == 0, 0.8 * theta + 0.05, 0.8 * theta)
## beta: beta_j + 0.1 / sd(X[, j]) for non-constant columns and + 0.1 for the
## intercept, i.e. each column moves the linear predictor by 0.1 of its SD.
## (A plain beta + 0.1 is meaningless for raw covariates such as HEIGHT
## (~400-550) or I(age^2) (up to ~400): PIRLS then fails outright.)
beta_step <- function(X) {
  s <- apply(as.matrix(X), 2, sd)
  ifelse(s > 0, 0.1 / s, 0.1)
}
perturb_beta <- function(beta, X) beta + beta_step(X)
PERTURBATION_TEXT <- "theta_p = 0.8*theta + 0.05 where lower == 0 (0.8*theta elsewhere); beta_p = beta + 0.1/sd(X[,j]) (+0.1 for constant columns such as the intercept)"

## ===========================================================================
## Part A: random-effects structure from lFormula / glFormula (no fitting)
## ===========================================================================

structure_entry <- function(id, dataset, formula, data, family = NULL) {
  f <- as.formula(formula, env = globalenv())
  lf <- if (is.null(family)) lFormula(f, data = data)
        else glFormula(f, data = data, family = family)
  rt <- lf$reTrms
  asg <- attr(rt$flist, "assign")
  nl <- vapply(rt$flist, nlevels, 1L)[asg]
  Lt <- as(rt$Lambdat, "CsparseMatrix")
  LtT <- as(Lt, "TsparseMatrix")   # same order as Lt@x, which Lind indexes
  list(
    id = id, dataset = dataset, formula = formula,
    family = if (is.null(family)) "gaussian (lmer)" else family$family,
    link = if (is.null(family)) "identity" else family$link,
    nobs = nrow(lf$X),
    X = list(dim = arr(dim(lf$X)), colnames = arr(colnames(lf$X))),
    Zt = sparse_json(rt$Zt),
    theta = arr(rt$theta),
    theta_names = arr(theta_names(rt$cnms)),
    lower = arr(rt$lower),
    Lind = arr(rt$Lind),  # 1-based, as lme4: Lambdat@x = theta[Lind]
    Lambdat = list(dim = arr(dim(Lt)), i = arr(LtT@i), j = arr(LtT@j),
                   note = "0-based i,j in the storage order of Lambdat@x (column-major), i.e. the order that Lind refers to"),
    cnms = lapply(seq_along(rt$cnms), function(k)
      list(group = names(rt$cnms)[k], columns = arr(rt$cnms[[k]]),
           nl = unname(nl[k]), Gp_start = rt$Gp[k])),
    nl = arr(nl),
    Gp = arr(rt$Gp),
    flist = lapply(names(rt$flist), function(nm)
      list(name = nm, nlevels = nlevels(rt$flist[[nm]]),
           levels = arr(levels(rt$flist[[nm]])))),
    flist_assign = arr(asg)  # 1-based: term k uses grouping factor flist[[asg[k]]]
  )
}

message("Part A: structures")
structure_specs <- list(
  list("cbpp_herd", "cbpp", "cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp, binomial()),
  list("sleep_corr", "sleepstudy", "Reaction ~ Days + (Days | Subject)", sleepstudy, NULL),
  list("sleep_uncorr", "sleepstudy", "Reaction ~ Days + (Days || Subject)", sleepstudy, NULL),
  list("sleep_slope_only", "sleepstudy", "Reaction ~ Days + (0 + Days | Subject)", sleepstudy, NULL),
  list("sleep_two_terms", "sleepstudy", "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)", sleepstudy, NULL),
  list("grouse_nested", "grouseticks", "TICKS ~ YEAR + HEIGHT + (1 | LOCATION/BROOD)", grouseticks, poisson()),
  list("grouse_three", "grouseticks", "TICKS ~ YEAR + HEIGHT + (1 | INDEX) + (1 | BROOD) + (1 | LOCATION)", grouseticks, poisson()),
  list("verbagg_crossed", "VerbAgg", "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", VerbAgg, binomial()),
  list("contra_urban", "Contraception", "use ~ age + I(age^2) + urban + livch + (1 + urban | district)", Contraception, binomial()),
  list("pastes_nested", "Pastes", "strength ~ 1 + (1 | batch/cask)", Pastes, NULL),
  list("pastes_interaction", "Pastes", "strength ~ 1 + (1 | batch:cask)", Pastes, NULL),
  list("penicillin_crossed", "Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", Penicillin, NULL),
  list("dyestuff", "Dyestuff", "Yield ~ 1 + (1 | Batch)", Dyestuff, NULL),
  list("sleep_log_response", "sleepstudy", "log(Reaction) ~ Days + (1 + Days | Subject)", sleepstudy, NULL)
)
structure_out <- list(); structure_failures <- list()
for (s in structure_specs) {
  r <- tryCatch(do.call(structure_entry, s), error = function(e) e)
  if (inherits(r, "error")) {
    message("  FAILED ", s[[1]], ": ", conditionMessage(r))
    structure_failures[[s[[1]]]] <- conditionMessage(r)
  } else structure_out[[length(structure_out) + 1]] <- r
}

## ===========================================================================
## Part B helpers: objective (deviance function) at fixed parameters
## ===========================================================================

## Saturated-model constant  -2 * sum_i log p(y_i | mu_i = y_i)  (prior
## weights included), computed with the family's own aic() exactly as lme4's
## glmResp does.  Binary responses give 0.
saturated_m2ll <- function(fit) {
  r <- fit@resp
  r$family$aic(r$y, r$n, r$y, r$weights, 0)
}

## Independent (not lme4's code) -2 log marginal likelihoods of a GLMM with
## ONE scalar random-intercept term (1 | g) and a family whose aic() is
## -2 log p(y | mu) (binomial, poisson).  Per level g, with
##   h_g(u) = sum_{i in g} log p(y_i | mu_i(u)) + log phi(u),
##   mu_i(u) = linkinv(offset_i + x_i' beta + theta * u):
##   exact            -2 sum_g log int exp(h_g(u)) du  (R integrate, rel.tol 1e-12)
##   laplace_observed -2 sum_g [h_g(u_g) + log(2 pi)/2 - log(-h_g''(u_g))/2]
##                    (u_g the mode; observed curvature; = glmmTMB's Laplace)
##   laplace_fisher   the same with -h'' replaced by 1 + theta^2 sum_i w_i,
##                    w_i = prior_wt * mu'(eta)^2 / V(mu) (expected information,
##                    the IRLS weights; = lme4's Laplace).  Identical to
##                    laplace_observed for canonical links (logit, log-Poisson).
scalar_m2ll_checks <- function(fit, theta, beta) {
  r <- fit@resp; fam <- r$family
  X <- getME(fit, "X"); g <- getME(fit, "flist")[[1]]
  eta0 <- drop(X %*% beta) + r$offset
  tot <- c(exact = 0, laplace_observed = 0, laplace_fisher = 0)
  for (lev in levels(g)) {
    i <- which(g == lev)
    h <- function(u) vapply(u, function(uu)
      -0.5 * fam$aic(r$y[i], r$n[i], fam$linkinv(eta0[i] + theta * uu),
                     r$weights[i], 0) + dnorm(uu, log = TRUE), 0)
    md <- optimize(function(u) -h(u), c(-12, 12), tol = 1e-12)$minimum
    hm <- h(md); e <- 1e-3
    ## 5-point second derivative, truncation error O(e^4)
    curv <- -(-h(md + 2 * e) + 16 * h(md + e) - 30 * hm + 16 * h(md - e) - h(md - 2 * e)) / (12 * e^2)
    s <- 1 / sqrt(max(curv, 1e-8))
    I <- integrate(function(u) exp(h(u) - hm), md - 15 * s, md + 15 * s,
                   rel.tol = 1e-12, abs.tol = 0, subdivisions = 1000L)$value
    eta <- eta0[i] + theta * md; mu <- fam$linkinv(eta)
    w <- r$weights[i] * fam$mu.eta(eta)^2 / fam$variance(mu)
    tot <- tot + c(hm + log(I),
                   hm + 0.5 * log(2 * pi) - 0.5 * log(curv),
                   hm + 0.5 * log(2 * pi) - 0.5 * log(1 + theta^2 * sum(w)))
  }
  as.list(-2 * tot)
}

## Dense Gaussian check for lmer: V0 = I + Z Lambda Lambda' Z',
## r = y - X beta,  with V = sigma^2 V0 (lmer's theta is relative to sigma):
##   ML  : -2 l   = n log(2 pi s^2)     + log|V0|                 + r'V0^-1 r / s^2
##   REML: -2 l_R = (n-p) log(2 pi s^2) + log|V0| + log|X'V0^-1 X| + r'V0^-1 r / s^2
dense_gauss_m2ll <- function(fit, theta, beta, sigma, REML) {
  Lt <- getME(fit, "Lambdat"); Lt@x <- theta[getME(fit, "Lind")]
  ZL <- as.matrix(getME(fit, "Z") %*% t(Lt))
  X <- getME(fit, "X"); y <- getME(fit, "y"); n <- length(y); p <- ncol(X)
  V0 <- diag(n) + tcrossprod(ZL)
  R <- chol(V0)
  ldV0 <- 2 * sum(log(diag(R)))
  res <- y - drop(X %*% beta)
  q <- sum(backsolve(R, res, transpose = TRUE)^2)
  if (!REML) return(n * log(2 * pi * sigma^2) + ldV0 + q / sigma^2)
  W <- backsolve(R, X, transpose = TRUE)
  ldXVX <- as.numeric(determinant(crossprod(W), logarithm = TRUE)$modulus)
  (n - p) * log(2 * pi * sigma^2) + ldV0 + ldXVX + q / sigma^2
}

## lmer: devfun(theta) profiles out beta and sigma.
lmer_devfun_record <- function(fit) {
  dd <- update(fit, devFunOnly = TRUE)
  e <- environment(dd)
  X <- getME(fit, "X"); n <- nrow(X); p <- ncol(X)
  th_names <- names(getME(fit, "theta"))
  reml <- isREML(fit)
  at <- function(theta) {
    val <- dd(unname(theta))
    beta <- e$pp$beta(1); names(beta) <- colnames(X)
    pwrss <- e$resp$wrss() + e$pp$sqrL(1)          # ||W^1/2 (y - X b - Z L u)||^2 + ||u||^2
    s_ml <- sqrt(pwrss / n); s_reml <- sqrt(pwrss / (n - p))
    sig <- if (reml) s_reml else s_ml
    names(theta) <- th_names
    list(theta = nlist(theta), value = val,
         beta_hat = nlist(beta), sigma_hat = sig,
         sigma_hat_ML = s_ml, sigma_hat_REML = s_reml,
         pwrss = pwrss, ldL2 = e$pp$ldL2(), ldRX2 = e$pp$ldRX2(),
         dense_check = dense_gauss_m2ll(fit, unname(theta), beta, sig, reml))
  }
  th <- getME(fit, "theta")
  lower <- getME(fit, "lower")
  list(
    arguments = "theta only (beta and sigma are profiled out)",
    n_args = length(th),
    criterion = if (reml) "REML criterion = -2 * restricted log-likelihood at sigma_hat_REML(theta)"
                else "ML deviance = -2 * log-likelihood at (beta_hat(theta), theta, sigma_hat_ML(theta))",
    formula = if (reml) "value = ldL2 + ldRX2 + (n-p) * (1 + log(2*pi*pwrss/(n-p)))"
              else "value = ldL2 + n * (1 + log(2*pi*pwrss/n))",
    how_beta_sigma = "beta_hat = environment(dd)$pp$beta(1) after dd(theta); pwrss = resp$wrss() + pp$sqrL(1); sigma_hat_ML = sqrt(pwrss/n), sigma_hat_REML = sqrt(pwrss/(n-p))",
    dense_check_meaning = "the same criterion recomputed densely from V = sigma_hat^2 (I + Z Lambda Lambda' Z') (independent of lme4's sparse code)",
    optimum = at(th),
    perturbed = at(perturb_theta(th, lower)),
    perturbation = "theta_p = 0.8*theta + 0.05 where lower == 0, 0.8*theta elsewhere"
  )
}

## glmer (nAGQ >= 1): devfun(pars) with pars = c(theta, beta); PIRLS over u.
glmer_devfun_record <- function(fit, scalar_exact = FALSE) {
  ## control = gctrl so that the inner PIRLS tolerance is tight (1e-12) also
  ## for glmer.nb, whose final glmer call carries the default control.
  dd <- update(fit, devFunOnly = TRUE, control = gctrl)
  th <- getME(fit, "theta"); b <- fixef(fit)
  lower <- getME(fit, "lower")[seq_along(th)]
  nagq <- fit@devcomp$dims[["nAGQ"]]
  fam <- family(fit)$family
  sat_ok <- fam %in% c("binomial", "poisson")
  sat <- if (sat_ok) saturated_m2ll(fit) else NA
  at <- function(theta, beta) {
    names(theta) <- names(th); names(beta) <- names(b)
    val <- dd(unname(c(theta, beta)))
    r <- list(theta = nlist(theta), beta = nlist(beta), value = val)
    if (nagq == 1) r$m2ll_full <- val
    if (sat_ok) {
      if (nagq > 1) {
        r$m2ll_full <- val + sat
        r$m2ll_minus_saturated <- val
      } else {
        r$m2ll_minus_saturated <- val - sat
      }
    }
    if (scalar_exact) r$independent <- scalar_m2ll_checks(fit, unname(theta), unname(beta))
    r
  }
  opt <- at(th, b)
  pert <- at(perturb_theta(th, lower), perturb_beta(b, getME(fit, "X")))
  list(
    arguments = paste0("pars = c(theta, beta) (length ", length(th) + length(b),
                       "; names(formals(dd)) = '", paste(names(formals(dd)), collapse = ","), "')"),
    n_args = length(th) + length(b),
    nAGQ = nagq,
    value_meaning = if (nagq > 1)
        "AGQ: -2 log L MINUS the saturated constant, i.e. value = -2 log L_full - saturated_m2ll (lme4 sums deviance residuals in the quadrature); logLik(fit) = -value/2 at the optimum"
      else "Laplace: -2 log L_full (all normalising constants of the family included) = -2*logLik(fit) at the optimum",
    saturated_m2ll = if (sat_ok) sat else NULL,
    saturated_meaning = "-2 * sum_i w_i log p(y_i | mu_i = y_i), from family$aic(y, n, mu = y, wt, 0); binary response -> 0",
    reproduces_at_optimum = list(minus2logLik = -2 * as.numeric(logLik(fit)),
                                 deviance = deviance(fit),
                                 deviance_meaning = "lme4's deviance() for a GLMM = sum of squared deviance residuals at the conditional modes (NOT -2 logLik)"),
    optimum = opt,
    perturbed = pert,
    perturbation = PERTURBATION_TEXT,
    beta_step = nlist(setNames(beta_step(getME(fit, "X")), names(b))),
    independent_meaning = if (scalar_exact) paste(
      "independent R computations for the single scalar random intercept, all -2 log L with full constants:",
      "exact = per-group numerical integration (integrate, rel.tol 1e-12);",
      "laplace_observed = Laplace with the observed curvature -h''(u_hat) (glmmTMB's convention);",
      "laplace_fisher = Laplace with the expected information 1 + theta^2 sum w_i (IRLS weights; lme4's convention);",
      "the two Laplace variants coincide for canonical links") else NULL
  )
}

## ===========================================================================
## Part B: record an lme4 fit
## ===========================================================================

lme4_varcorr <- function(fit) df_records(as.data.frame(VarCorr(fit)))

lme4_ranef <- function(fit) {
  re <- ranef(fit, condVar = TRUE)
  out <- list()
  for (g in names(re)) {
    d <- re[[g]]
    if (nrow(d) > RANEF_MAX_LEVELS) next
    pv <- attr(d, "postVar")
    recs <- lapply(seq_len(nrow(d)), function(l) {
      r <- list(level = rownames(d)[l], condval = nlist(d[l, , drop = TRUE]))
      names(r$condval) <- colnames(d)
      if (is.array(pv) && length(dim(pv)) == 3) {
        cv <- pv[, , l]; cv <- matrix(cv, ncol(d), ncol(d))
        r$condvar <- lapply(seq_len(nrow(cv)), function(i) arr(cv[i, ]))
      } else if (is.list(pv)) {   # several terms on the same factor
        r$condvar_blocks <- lapply(pv, function(a) {
          cv <- matrix(a[, , l], dim(a)[1], dim(a)[2])
          lapply(seq_len(nrow(cv)), function(i) arr(cv[i, ]))
        })
      }
      r
    })
    out[[g]] <- list(columns = arr(colnames(d)), nlevels = nrow(d), levels = recs)
  }
  dfr <- as.data.frame(re)
  dfr <- dfr[dfr$grpvar %in% names(out), , drop = FALSE]
  list(by_factor = out, as_data_frame = df_records(dfr))
}

record_lme4 <- function(id, dataset, expr, tf,
                        scalar_exact = FALSE, profile = FALSE, extra = list()) {
  fit <- tf$value
  is_lmm <- !isGLMM(fit)
  fam <- family(fit)
  nagq <- if (is_lmm) NA else fit@devcomp$dims[["nAGQ"]]
  ll <- logLik(fit)
  stopifnot(identical(names(getME(fit, "theta")), theta_names(fit@cnms)))
  wald <- tryCatch(confint(fit, method = "Wald", oldNames = FALSE), error = function(e) NULL)
  prof <- NULL; prof_warn <- character()
  if (profile) {
    pc <- capture(quote(confint(fit, method = "profile", oldNames = FALSE)),
                  envir = environment())
    prof <- pc$value; prof_warn <- pc$warnings
  }
  rec <- list(
    id = id, dataset = dataset, formula = formula_string(expr), engine = "lme4",
    call = call_string(expr),
    family = fam$family, link = fam$link,
    method = if (is_lmm) (if (isREML(fit)) "REML" else "ML") else if (nagq > 1) "AGQ" else "Laplace",
    nAGQ = nagq, REML = isREML(fit),
    logLik = as.numeric(ll), logLik_df = attr(ll, "df"),
    minus2logLik = -2 * as.numeric(ll),
    deviance = if (is_lmm) deviance(fit, REML = FALSE) else deviance(fit),
    deviance_meaning = if (is_lmm) "deviance(fit, REML = FALSE): -2 * ML log-likelihood at these estimates"
                       else "sum of squared deviance residuals at the conditional modes (lme4's deviance() for GLMMs)",
    REMLcrit = if (is_lmm && isREML(fit)) REMLcrit(fit) else NULL,
    AIC = AIC(fit), BIC = BIC(fit), df_resid = df.residual(fit), nobs = nobs(fit),
    fixef = nlist(fixef(fit)),
    se = nlist(sqrt(diag(as.matrix(vcov(fit))))),
    vcov = mat_json(vcov(fit)),
    theta = nlist(getME(fit, "theta")),
    theta_meaning = if (is_lmm) "relative Cholesky factor: Cov(b) = sigma^2 * Lambda Lambda'"
                    else "Cholesky factor of Cov(b) (no sigma scaling in the linear predictor)",
    lower = arr(getME(fit, "lower")),
    sigma = sigma(fit),
    varcorr = lme4_varcorr(fit),
    ranef = lme4_ranef(fit),
    fitted_head = arr(fitted(fit)[1:10]),
    wald_ci = ci_records(wald),
    profile_ci = ci_records(prof),
    profile_warnings = if (profile) arr(prof_warn) else NULL,
    profile_note = if (profile) "confint(method = 'profile') in lme4 1.1-31 profiles the ML deviance also for REML fits (dyestuff_reml and dyestuff_ml give the same intervals); 'convergence code 3 from bobyqa' warnings come from the profile's inner refits (rhoend 1e-10) and do not change the intervals (checked against default control to ~1e-8)" else NULL,
    convergence = list(
      optimizer = fit@optinfo$optimizer,
      optimizer_message = fit@optinfo$message,
      optimizer_conv = fit@optinfo$conv$opt,
      lme4_messages = arr(unlist(fit@optinfo$conv$lme4$messages)),
      feval = fit@optinfo$feval,
      fit_warnings = arr(tf$warnings), fit_messages = arr(tf$messages)),
    is_singular = isSingular(fit),
    nb_size = if (grepl("^Negative Binomial", fam$family)) getME(fit, "glmer.nb.theta") else NULL,
    time_sec = tf$time_sec, time_runs = tf$time_runs,
    devfun = if (is_lmm) lmer_devfun_record(fit)
             else glmer_devfun_record(fit, scalar_exact)
  )
  if (!is_lmm) {
    rec$saturated_m2ll <- rec$devfun$saturated_m2ll
    if (nagq > 1 && !is.null(rec$saturated_m2ll)) {
      ## lme4's logLik/AIC/BIC omit the saturated constant at nAGQ > 1;
      ## these are the full-constant versions, comparable with Laplace/glmmTMB.
      rec$logLik_full <- rec$logLik - rec$saturated_m2ll / 2
      rec$AIC_full <- rec$AIC + rec$saturated_m2ll
      rec$BIC_full <- rec$BIC + rec$saturated_m2ll
    } else rec$logLik_full <- rec$logLik
  }
  c(rec, extra)
}

## ===========================================================================
## Part B: record a glmmTMB fit
## ===========================================================================

tmb_varcorr <- function(fit) {
  vc <- VarCorr(fit)$cond
  recs <- list()
  for (g in names(vc)) {
    m <- vc[[g]]; sd <- attr(m, "stddev"); nm <- names(sd)
    for (i in seq_along(sd))
      recs[[length(recs) + 1]] <- list(grp = g, var1 = nm[i], var2 = NA,
                                       vcov = unname(sd[i]^2), sdcor = unname(sd[i]))
    if (length(sd) > 1) {
      cr <- attr(m, "correlation")
      for (i in 1:(length(sd) - 1)) for (j in (i + 1):length(sd))
        recs[[length(recs) + 1]] <- list(grp = g, var1 = nm[i], var2 = nm[j],
                                         vcov = unname(m[i, j]), sdcor = unname(cr[i, j]))
    }
  }
  if (family(fit)$family == "gaussian")
    recs[[length(recs) + 1]] <- list(grp = "Residual", var1 = NA, var2 = NA,
                                     vcov = sigma(fit)^2, sdcor = sigma(fit))
  recs
}

record_tmb <- function(id, dataset, expr, tf, lme4_twin = NULL, extra = list()) {
  fit <- tf$value
  fam <- family(fit)
  reml <- isTRUE(fit$modelInfo$REML)
  ll <- logLik(fit)
  re <- tryCatch(as.data.frame(ranef(fit, condVar = TRUE)), error = function(e) NULL)
  if (!is.null(re)) {
    keep <- names(which(table(re$grpvar) <= RANEF_MAX_LEVELS))
    re <- re[re$grpvar %in% keep, , drop = FALSE]
  }
  wald <- tryCatch(confint(fit, method = "wald"), error = function(e) NULL)
  rec <- list(
    id = id, dataset = dataset, formula = formula_string(expr), engine = "glmmTMB",
    call = call_string(expr),
    family = fam$family, link = fam$link,
    method = if (reml) "REML" else if (fam$family == "gaussian" && fam$link == "identity") "ML" else "Laplace",
    nAGQ = 1, REML = reml,
    logLik = as.numeric(ll), logLik_df = attr(ll, "df"),
    minus2logLik = -2 * as.numeric(ll),
    logLik_full = as.numeric(ll),
    AIC = AIC(fit), BIC = BIC(fit), df_resid = df.residual(fit), nobs = nobs(fit),
    fixef = nlist(fixef(fit)$cond),
    se = nlist(sqrt(diag(vcov(fit)$cond))),
    vcov = mat_json(vcov(fit)$cond),
    theta = arr(getME(fit, "theta")),
    theta_meaning = "glmmTMB theta: log standard deviations of each term, then its correlation parameters (glmmTMB's own scale, not lme4's Cholesky theta)",
    sigma = sigma(fit),
    varcorr = tmb_varcorr(fit),
    ranef = if (is.null(re)) NULL else list(as_data_frame = df_records(re)),
    fitted_head = arr(fitted(fit)[1:10]),
    wald_ci = ci_records(wald),
    convergence = list(optimizer = "nlminb",
                       convergence = fit$fit$convergence,
                       optimizer_message = fit$fit$message,
                       iterations = fit$fit$iterations,
                       pdHess = fit$sdr$pdHess,
                       max_abs_gradient = tryCatch(max(abs(fit$sdr$gradient.fixed)), error = function(e) NA),
                       fit_warnings = arr(tf$warnings), fit_messages = arr(tf$messages)),
    is_singular = NULL,
    time_sec = tf$time_sec, time_runs = tf$time_runs
  )
  ## TMB objective at fixed parameters: obj$fn(par) = -log L (Laplace, full
  ## constants; for REML = -restricted log L with beta integrated out).
  par <- fit$fit$par
  parnames <- names(par)
  fn_opt <- fit$obj$fn(par)
  step <- rep(0.1, length(par))
  if (!reml) step[parnames == "beta"] <- beta_step(fit$obj$env$data$X)
  pert <- par + step
  fn_pert <- fit$obj$fn(pert)
  obj <- list(
    meaning = "obj$fn(par) = -log L(par) (Laplace in u, full constants); par = fit$fit$par in TMB order (beta = fixed effects, betad = log dispersion parameter when present, theta = log SDs then correlation parameters); for REML fits beta is not in par and fn = -restricted log L",
    par_names = arr(parnames),
    optimum = list(par = arr(par), value = fn_opt),
    perturbed = list(par = arr(pert), value = fn_pert),
    perturbation = "beta + 0.1/sd(X[,j]) (+0.1 for constant columns); every other entry (betad, theta) + 0.1"
  )
  ## Cross-check with the lme4 twin at lme4's perturbed point (single scalar
  ## random intercept and no dispersion parameter: TMB par = c(beta, log(theta))).
  if (!is.null(lme4_twin) && length(lme4_twin$theta) == 1 && !any(parnames == "betad")) {
    dp <- lme4_twin$devfun$perturbed
    tp <- c(unlist(dp$beta), log(unlist(dp$theta)))
    obj$at_lme4_perturbed <- list(lme4_id = lme4_twin$id, par = arr(tp),
                                  value = fit$obj$fn(tp),
                                  twice_value = 2 * fit$obj$fn(tp),
                                  lme4_devfun_m2ll_full = dp$m2ll_full %||% dp$value,
                                  independent = dp$independent,
                                  meaning = "twice_value = 2*obj$fn at lme4's perturbed point (TMB par = c(beta_p, log(theta_p))): glmmTMB's Laplace -2 log L there, to compare with lme4's devfun (Fisher-information Laplace) and with the independent R values")
  }
  fit$obj$fn(par)   # restore TMB's internal state to the optimum
  rec$objective <- obj
  c(rec, extra)
}

`%||%` <- function(a, b) if (is.null(a)) b else a

## ===========================================================================
## Part B: the fits.  Each call is written out in full (quote()) and recorded
## verbatim in the JSON "call" field.
## ===========================================================================

fits_out <- list(); fit_failures <- list(); lme4_by_id <- list()

run <- function(id, dataset, expr, engine, ...) {
  message("  fit ", id)
  tf <- tryCatch(timed_fit(expr), error = function(e) e)
  if (inherits(tf, "error")) {
    fit_failures[[id]] <<- conditionMessage(tf)
    message("    FAILED: ", conditionMessage(tf)); return(invisible(NULL))
  }
  rec <- tryCatch(
    if (engine == "lme4") record_lme4(id, dataset, expr, tf, ...)
    else record_tmb(id, dataset, expr, tf, ...),
    error = function(e) e)
  if (inherits(rec, "error")) {
    fit_failures[[id]] <<- paste("recording failed:", conditionMessage(rec))
    message("    RECORD FAILED: ", conditionMessage(rec)); return(invisible(NULL))
  }
  if (length(rec$convergence$fit_warnings))
    message("    warnings: ", paste(rec$convergence$fit_warnings, collapse = " | "))
  fits_out[[length(fits_out) + 1]] <<- rec
  if (engine == "lme4") lme4_by_id[[id]] <<- rec
  invisible(rec)
}

message("Part B: fits")

## ---- 1-3. cbpp binomial (logit Laplace, AGQ 25, probit, cloglog) ---------
run("cbpp_logit_laplace", "cbpp", quote(
  glmer(cbind(incidence, size - incidence) ~ period + (1 | herd),
        data = cbpp, family = binomial(link = "logit"), control = gctrl)),
  "lme4", scalar_exact = TRUE)
run("cbpp_logit_laplace_tmb", "cbpp", quote(
  glmmTMB(cbind(incidence, size - incidence) ~ period + (1 | herd),
          data = cbpp, family = binomial(link = "logit"), control = tctrl)),
  "glmmTMB", lme4_twin = lme4_by_id$cbpp_logit_laplace)
run("cbpp_logit_agq25", "cbpp", quote(
  glmer(cbind(incidence, size - incidence) ~ period + (1 | herd),
        data = cbpp, family = binomial(link = "logit"), nAGQ = 25, control = gctrl)),
  "lme4", scalar_exact = TRUE)
run("cbpp_probit_laplace", "cbpp", quote(
  glmer(cbind(incidence, size - incidence) ~ period + (1 | herd),
        data = cbpp, family = binomial(link = "probit"), control = gctrl)),
  "lme4", scalar_exact = TRUE)
run("cbpp_probit_laplace_tmb", "cbpp", quote(
  glmmTMB(cbind(incidence, size - incidence) ~ period + (1 | herd),
          data = cbpp, family = binomial(link = "probit"), control = tctrl)),
  "glmmTMB", lme4_twin = lme4_by_id$cbpp_probit_laplace)
run("cbpp_cloglog_laplace", "cbpp", quote(
  glmer(cbind(incidence, size - incidence) ~ period + (1 | herd),
        data = cbpp, family = binomial(link = "cloglog"), control = gctrl)),
  "lme4", scalar_exact = TRUE)
run("cbpp_cloglog_laplace_tmb", "cbpp", quote(
  glmmTMB(cbind(incidence, size - incidence) ~ period + (1 | herd),
          data = cbpp, family = binomial(link = "cloglog"), control = tctrl)),
  "glmmTMB", lme4_twin = lme4_by_id$cbpp_cloglog_laplace)

## ---- 4-5. sleepstudy LMMs --------------------------------------------------
run("sleep_reml", "sleepstudy", quote(
  lmer(Reaction ~ Days + (Days | Subject), data = sleepstudy, REML = TRUE, control = lctrl)),
  "lme4", profile = TRUE)
run("sleep_reml_tmb", "sleepstudy", quote(
  glmmTMB(Reaction ~ Days + (Days | Subject), data = sleepstudy, REML = TRUE, control = tctrl)),
  "glmmTMB")
run("sleep_ml", "sleepstudy", quote(
  lmer(Reaction ~ Days + (Days | Subject), data = sleepstudy, REML = FALSE, control = lctrl)),
  "lme4", profile = TRUE)
run("sleep_ml_tmb", "sleepstudy", quote(
  glmmTMB(Reaction ~ Days + (Days | Subject), data = sleepstudy, REML = FALSE, control = tctrl)),
  "glmmTMB")
run("sleep_uncorr_ml", "sleepstudy", quote(
  lmer(Reaction ~ Days + (Days || Subject), data = sleepstudy, REML = FALSE, control = lctrl)),
  "lme4", profile = TRUE)

## ---- 6. grouseticks poisson, (1 | BROOD): Laplace (+TMB) and AGQ 10 -------
run("grouse_brood_laplace", "grouseticks", quote(
  glmer(TICKS ~ YEAR + HEIGHT + (1 | BROOD), data = grouseticks,
        family = poisson(link = "log"), control = gctrl)),
  "lme4", scalar_exact = TRUE)
run("grouse_brood_laplace_tmb", "grouseticks", quote(
  glmmTMB(TICKS ~ YEAR + HEIGHT + (1 | BROOD), data = grouseticks,
          family = poisson(link = "log"), control = tctrl)),
  "glmmTMB", lme4_twin = lme4_by_id$grouse_brood_laplace)
run("grouse_brood_agq10", "grouseticks", quote(
  glmer(TICKS ~ YEAR + HEIGHT + (1 | BROOD), data = grouseticks,
        family = poisson(link = "log"), nAGQ = 10, control = gctrl)),
  "lme4", scalar_exact = TRUE)

## ---- 7. grouseticks poisson, (1 | BROOD) + (1 | LOCATION) ------------------
## (BROOD is nested in LOCATION; with distinct BROOD labels this equals
##  (1 | LOCATION/BROOD))
run("grouse_brood_location_laplace", "grouseticks", quote(
  glmer(TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | LOCATION), data = grouseticks,
        family = poisson(link = "log"), control = gctrl)),
  "lme4")

## ---- 8. VerbAgg crossed binomial (binary factor response r2: N/Y) ---------
run("verbagg_laplace", "VerbAgg", quote(
  glmer(r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item),
        data = VerbAgg, family = binomial(link = "logit"), control = gctrl)),
  "lme4", extra = list(response_coding = "r2 is a factor with levels N, Y: first level (N) = 0 = failure, Y = 1 = success"))
run("verbagg_laplace_tmb", "VerbAgg", quote(
  glmmTMB(r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item),
          data = VerbAgg, family = binomial(link = "logit"), control = tctrl)),
  "glmmTMB", extra = list(response_coding = "r2 factor (N, Y): N = 0, Y = 1"))

## ---- 9 & 14. Contraception (binary factor response use: N/Y) --------------
contra_coding <- list(
  response_coding = "use is a factor with levels N, Y; glm/lme4 code the first level (N) as 0 = failure and every other level (Y) as 1 = success",
  response_check = list(sum_y = sum(as.integer(Contraception$use == "Y")),
                        n = nrow(Contraception)))
run("contra_int_laplace", "Contraception", quote(
  glmer(use ~ age + I(age^2) + urban + livch + (1 | district),
        data = Contraception, family = binomial(link = "logit"), control = gctrl)),
  "lme4", scalar_exact = TRUE, extra = contra_coding)
run("contra_int_agq20", "Contraception", quote(
  glmer(use ~ age + I(age^2) + urban + livch + (1 | district),
        data = Contraception, family = binomial(link = "logit"), nAGQ = 20, control = gctrl)),
  "lme4", scalar_exact = TRUE, extra = contra_coding)
run("contra_urban_laplace", "Contraception", quote(
  glmer(use ~ age + I(age^2) + urban + livch + (1 + urban | district),
        data = Contraception, family = binomial(link = "logit"), control = gctrl)),
  "lme4", extra = contra_coding)

## glmmTMB twins (not in the original brief): an independent optimiser on the
## same Laplace objective (logit is canonical, so lme4 and glmmTMB agree),
## which confirms that the lme4 fits above are converged despite the
## "nearly unidentifiable: very large eigenvalue" warning caused by the raw
## I(age^2) column.
run("contra_int_laplace_tmb", "Contraception", quote(
  glmmTMB(use ~ age + I(age^2) + urban + livch + (1 | district),
          data = Contraception, family = binomial(link = "logit"), control = tctrl)),
  "glmmTMB", lme4_twin = lme4_by_id$contra_int_laplace, extra = contra_coding)
run("contra_urban_laplace_tmb", "Contraception", quote(
  glmmTMB(use ~ age + I(age^2) + urban + livch + (1 + urban | district),
          data = Contraception, family = binomial(link = "logit"), control = tctrl)),
  "glmmTMB", extra = contra_coding)

## ---- 10. negative binomial --------------------------------------------------
run("grouse_nb2_tmb", "grouseticks", quote(
  glmmTMB(TICKS ~ YEAR + HEIGHT + (1 | BROOD), data = grouseticks,
          family = nbinom2(link = "log"), control = tctrl)),
  "glmmTMB", extra = list(sigma_meaning = "nbinom2: sigma() is the NB size parameter theta (Var = mu + mu^2/theta); TMB betad = log(theta)"))
## glmer.nb alternates theta (NB size) optimisation with glmer fits; its
## devfun is the one of the final glmer fit with family negative.binomial(theta)
## held fixed, i.e. pars = c(theta_RE, beta) with the NB size NOT a parameter.
run("grouse_nb_lme4", "grouseticks", quote(
  glmer.nb(TICKS ~ YEAR + HEIGHT + (1 | BROOD), data = grouseticks)),
  "lme4", extra = list(sigma_meaning = "lme4 glmer.nb: NB size theta = getME(fit, 'glmer.nb.theta') (field nb_size; Var(y|b) = mu + mu^2/theta, same as glmmTMB nbinom2 sigma()); sigma(fit) = 1 (no scale parameter in the glmer fit)"))

## ---- 11. Gamma: simulated data ---------------------------------------------
## 30 groups x 10 observations; x ~ U(0,1); b ~ N(0, 0.3^2);
## eta = 1 + 0.5 x + b_g; y ~ Gamma(shape = 4, rate = shape / exp(eta)),
## so E(y | b) = exp(eta).  Written with 17 significant digits and read back,
## so R fits exactly the doubles the Python side parses.
set.seed(1)
n_groups <- 30L; n_per <- 10L; shape_true <- 4
g_id <- rep(seq_len(n_groups), each = n_per)
x_sim <- runif(n_groups * n_per)
b_sim <- rnorm(n_groups, 0, 0.3)
eta_sim <- 1 + 0.5 * x_sim + b_sim[g_id]
y_sim <- rgamma(n_groups * n_per, shape = shape_true, rate = shape_true / exp(eta_sim))
writeLines(c("y,x,g", sprintf("%.17g,%.17g,%s", y_sim, x_sim, sprintf("g%02d", g_id))), out_csv)
gamma_sim <- read.csv(out_csv, stringsAsFactors = TRUE)
stopifnot(identical(gamma_sim$y, y_sim), identical(gamma_sim$x, x_sim))

run("gamma_log_tmb", "gamma_sim", quote(
  glmmTMB(y ~ x + (1 | g), data = gamma_sim, family = Gamma(link = "log"), control = tctrl)),
  "glmmTMB", extra = list(sigma_meaning = "glmmTMB Gamma: sigma() = 1/sqrt(shape) = coefficient of variation of y given b; shape = 1/sigma^2 (TMB betad = log(sigma))"))
run("gamma_inverse_tmb", "gamma_sim", quote(
  glmmTMB(y ~ x + (1 | g), data = gamma_sim, family = Gamma(link = "inverse"), control = tctrl)),
  "glmmTMB", extra = list(sigma_meaning = "glmmTMB Gamma: sigma() = 1/sqrt(shape) = coefficient of variation of y given b"))
run("gamma_log_lme4", "gamma_sim", quote(
  glmer(y ~ x + (1 | g), data = gamma_sim, family = Gamma(link = "log"), control = gctrl)),
  "lme4")

## ---- 12. Gaussian response with log link (glmmTMB) --------------------------
run("sleep_gausslog_tmb", "sleepstudy", quote(
  glmmTMB(Reaction ~ Days + (1 | Subject), data = sleepstudy,
          family = gaussian(link = "log"), control = tctrl)),
  "glmmTMB", extra = list(sigma_meaning = "residual SD of y given b (ML)"))

## ---- 13. small classic LMMs ----------------------------------------------------
run("penicillin_reml", "Penicillin", quote(
  lmer(diameter ~ 1 + (1 | plate) + (1 | sample), data = Penicillin, REML = TRUE, control = lctrl)),
  "lme4", profile = TRUE)
run("pastes_reml", "Pastes", quote(
  lmer(strength ~ 1 + (1 | batch/cask), data = Pastes, REML = TRUE, control = lctrl)),
  "lme4", profile = TRUE)
run("dyestuff_reml", "Dyestuff", quote(
  lmer(Yield ~ 1 + (1 | Batch), data = Dyestuff, REML = TRUE, control = lctrl)),
  "lme4", profile = TRUE)
run("dyestuff_ml", "Dyestuff", quote(
  lmer(Yield ~ 1 + (1 | Batch), data = Dyestuff, REML = FALSE, control = lctrl)),
  "lme4", profile = TRUE)

## ===========================================================================
## Extra verification: the Gamma glmer's sigma / VarCorr conventions, and the
## devfun argument conventions for nAGQ = 0, 1, 25 (cbpp).
## ===========================================================================

gamma_lme4_notes <- local({
  f <- eval(quote(glmer(y ~ x + (1 | g), data = gamma_sim, family = Gamma(link = "log"), control = gctrl)),
            envir = globalenv())
  n <- nobs(f)
  pr2 <- sum(residuals(f, type = "pearson")^2)
  u2 <- sum(getME(f, "u")^2)
  vc <- as.data.frame(VarCorr(f))
  list(
    sigma = sigma(f),
    sqrt_sum_pearson2_plus_u2_over_n = sqrt((pr2 + u2) / n),
    sqrt_sum_pearson2_over_n = sqrt(pr2 / n),
    sqrt_sum_pearson2_over_df_resid = sqrt(pr2 / df.residual(f)),
    theta = unname(getME(f, "theta")),
    varcorr_sd_g = vc$sdcor[vc$grp == "g"],
    theta_times_sigma = unname(getME(f, "theta")) * sigma(f),
    meaning = paste(
      "lme4 glmer Gamma: sigma(fit) = devcomp sigmaML = sqrt(pwrss/n), pwrss = sum of squared Pearson residuals + ||u||^2",
      "(see sqrt_sum_pearson2_plus_u2_over_n), a moment estimate of the coefficient of variation of y|b (glmmTMB's",
      "sigma() = 1/sqrt(shape) estimates the same quantity by ML).",
      "The devfun's linear predictor is X beta + Z Lambda(theta) u with penalty ||u||^2, and PIRLS weights do not",
      "include 1/dispersion, while as.data.frame(VarCorr(fit)) reports the intercept SD as theta*sigma",
      "(varcorr_sd_g = theta_times_sigma above); neither theta nor theta*sigma is a maximum-likelihood SD.",
      "The Laplace devfun/logLik uses Gamma()$aic, which plugs in dispersion = (sum of deviance residuals)/n",
      "instead of a shape parameter, and adds 2; so logLik/AIC are not comparable with glmmTMB's.",
      "Use the glmmTMB Gamma fits as the likelihood references."))
})

devfun_conventions <- local({
  out <- list()
  for (k in c(0, 1, 25)) {
    f <- glmer(cbind(incidence, size - incidence) ~ period + (1 | herd),
               data = cbpp, family = binomial, nAGQ = k, control = gctrl)
    dd <- update(f, devFunOnly = TRUE)
    nlow <- length(environment(dd)$lower)
    val <- if (k == 0) dd(getME(f, "theta")) else dd(c(getME(f, "theta"), fixef(f)))
    out[[paste0("nAGQ_", k)]] <- list(
      formals = arr(names(formals(dd))),
      n_parameters = nlow,
      parameters = if (k == 0) "theta only (beta from PIRLS jointly with u)" else "c(theta, beta)",
      value_at_optimum = val,
      minus2logLik = -2 * as.numeric(logLik(f)),
      deviance = deviance(f),
      saturated_m2ll = saturated_m2ll(f))
  }
  out$summary <- paste(
    "glmer devfun: nAGQ = 0 takes theta only; nAGQ >= 1 takes c(theta, beta).",
    "nAGQ = 0 and 1 return the Laplace -2 log L with all constants (= -2*logLik).",
    "nAGQ > 1 returns -2 log L minus the saturated-model constant saturated_m2ll",
    "(= -2 sum log p(y_i | mu_i = y_i)); lme4's logLik/AIC/BIC at nAGQ > 1 inherit that omission.",
    "deviance(fit) for any glmer is the sum of squared deviance residuals at the modes, neither of the above.")
  out
})

## ===========================================================================
## Write JSON
## ===========================================================================

meta <- list(
  generated_by = "tests/reference/make_refs.R",
  date = format(Sys.time(), "%Y-%m-%d"),
  R_version = R.version.string,
  packages = list(lme4 = as.character(packageVersion("lme4")),
                  glmmTMB = as.character(packageVersion("glmmTMB")),
                  TMB = as.character(packageVersion("TMB")),
                  Matrix = as.character(packageVersion("Matrix")),
                  mlmRev = as.character(packageVersion("mlmRev")),
                  jsonlite = as.character(packageVersion("jsonlite"))),
  platform = R.version$platform,
  controls = list(
    lctrl = 'lmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5, rhoend = 1e-10))',
    gctrl = 'glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5, rhoend = 1e-10), tolPwrss = 1e-12)',
    glmer.nb = 'default glmerControl() (see the comment in make_refs.R)',
    tctrl = 'glmmTMBControl(optCtrl = list(iter.max = 1e4, eval.max = 1e4))'),
  index_base = "all indices 0-based except Lind and flist_assign (1-based, as lme4)",
  precision = "jsonlite digits = NA: 15 significant digits",
  ranef_max_levels = RANEF_MAX_LEVELS,
  timing = "time_sec: elapsed seconds of the fit call; median of 3 runs when the first run took < 5 s",
  gamma_sim = list(file = "gamma_sim.csv", seed = 1, n_groups = n_groups, n_per_group = n_per,
                   recipe = "set.seed(1); g <- rep(1:30, each = 10); x <- runif(300); b <- rnorm(30, 0, 0.3); eta <- 1 + 0.5*x + b[g]; y <- rgamma(300, shape = 4, rate = 4/exp(eta)); g labels sprintf('g%02d', g)",
                   true_values = list(beta = c(1, 0.5), sd_g = 0.3, shape = shape_true, cv = 1 / sqrt(shape_true))),
  gamma_lme4_notes = gamma_lme4_notes,
  devfun_conventions = devfun_conventions,
  structure_failures = structure_failures,
  fit_failures = fit_failures
)

write_json(list(meta = meta, structure = structure_out, fits = fits_out), out_json,
           digits = NA, auto_unbox = TRUE, pretty = TRUE, na = "null", null = "null")
message("wrote ", out_json, " (", length(structure_out), " structures, ",
        length(fits_out), " fits; failures: ",
        length(structure_failures) + length(fit_failures), ")")
