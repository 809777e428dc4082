#!/usr/bin/env Rscript
## ---------------------------------------------------------------------------
## make_toolkit_refs.R -- reference values from R's emmeans and performance for
## ngmm_formula's toolkit (emmeans.py, performance.py); issue 18.
##
## Regenerate (from the repository root; about 20 seconds):
##
##   apt-get install -y r-cran-lme4 r-cran-glmmtmb r-cran-mlmrev r-cran-jsonlite \
##                      r-cran-emmeans r-cran-performance r-cran-numderiv
##   Rscript tests/reference/make_toolkit_refs.R
##
## Writes toolkit_refs.json next to this script: "meta" (versions) and "models", one
## entry per model with
##   call, fixef, vcov (rownames/colnames/data), sigma,
##   precise_vcov, precise_vcov_check   glmmTMB models only (see below)
##   variances   insight::get_variance(fit): var.fixed, var.random, var.residual,
##               var.distribution, var.dispersion
##   null_intercept  fixef of insight::null_model(fit) (count families only: it sets the
##               distribution-specific variance log1p(V(mu)/mu^2), mu = exp(intercept))
##   r2          performance::r2_nakagawa(fit): conditional, marginal
##   icc         performance::icc(fit): adjusted, conditional (= unadjusted)
##   emmeans     list of {specs, by, type, at, table}, table = as.data.frame(summary(emm))
##   pairs       list of {specs, by, adjust, table}, table = as.data.frame(pairs(emm, adjust))
## CI never runs R; the tests read the JSON (tests/test_emmeans.py,
## tests/test_performance.py).
##
## Degrees of freedom: asymptotic (df = Inf, z tests) everywhere, the convention emmeans
## uses for lme4's glmer. emmeans 1.8.4 would give glmmTMB fits the residual df (e.g. 51
## for cbpp) and lmer fits Kenward-Roger df, so we ask for df = Inf (glmmTMB) and
## lmer.df = "asymptotic" (lmer); the SEs are then the plain Wald ones, sqrt(l' V l) with
## V = vcov(fit) for lmer and V = precise_vcov (below) for glmmTMB.
## Numbers are written with 15 significant digits (jsonlite digits = NA).
##
## Covariance of the glmmTMB fits (precise_vcov). glmmTMB's vcov() comes from TMB's
## sdreport(), whose Hessian of the outer parameters (beta, theta) is optimHess(): central
## differences of the AD gradient with absolute step 1e-3. On Contraception that step is 1.4
## SEs of the raw I(age^2) coefficient (SE 7.3e-4) and costs 1.5e-4 relative in the SEs (the
## error falls as step^2: 1.5e-6 at 1e-4).
## For every glmmTMB model we therefore also compute
##   H = numDeriv::jacobian(obj$gr, par)  (Richardson extrapolation, symmetrised),
## at the optimum par = fit$fit$par, V = solve(H)[beta, beta], and store it as
## precise_vcov; the emmeans and pairs tables of those models use it (vcov. = V). As a
## check, numDeriv::hessian(obj$fn, par) (Richardson on the Laplace objective itself) is
## computed too; precise_vcov_check holds the max relative difference of the SEs of the two
## and of glmmTMB's vcov() against precise_vcov. vcov stays glmmTMB's vcov(fit). The lmer
## model keeps vcov(fit) (closed form, no finite differences). We do not re-optimise:
## nlminb from fit$fit$par with rel.tol 1e-15 moves par by ~1e-7 relative and the SEs by
## ~1e-8 on Contraception, far below the Hessian's effect.
## ---------------------------------------------------------------------------

suppressPackageStartupMessages({
  library(lme4)
  library(glmmTMB)
  library(mlmRev)
  library(emmeans)
  library(performance)
  library(insight)
  library(jsonlite)
  library(numDeriv)
})

script_dir <- local({
  a <- commandArgs(trailingOnly = FALSE)
  f <- sub("^--file=", "", a[grep("^--file=", a)])
  if (length(f)) dirname(normalizePath(f)) else getwd()
})
out_json <- file.path(script_dir, "toolkit_refs.json")

data("cbpp", "sleepstudy", "grouseticks", package = "lme4", envir = globalenv())
data("Contraception", package = "mlmRev", envir = globalenv())

tctrl <- glmmTMBControl(optCtrl = list(iter.max = 1e4, eval.max = 1e4))  # as make_refs.R
lctrl <- lmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5, rhoend = 1e-10))

mat <- function(m) list(rownames = rownames(m), colnames = colnames(m),
                        data = unname(split(unname(m), row(m))))
fixef_all <- function(fit) {
  fe <- lme4::fixef(fit)
  if (is.list(fe)) fe$cond else fe
}
vcov_all <- function(fit) {
  v <- vcov(fit)
  if (is.list(v)) v$cond else as.matrix(v)
}

## the covariance of the fixed effects from a Richardson-extrapolated Hessian of glmmTMB's
## Laplace objective at the optimum (see the header); restores TMB's state afterwards, since
## evaluating obj$fn / obj$gr near the optimum may update last.par.best
precise_vcov <- function(fit) {
  obj <- fit$obj
  env <- obj$env
  saved <- list(last.par = env$last.par, last.par.best = env$last.par.best,
                value.best = env$value.best)
  par <- fit$fit$par
  H <- numDeriv::jacobian(obj$gr, par)
  H <- (H + t(H)) / 2
  H_fn <- numDeriv::hessian(obj$fn, par)
  env$last.par <- saved$last.par
  env$last.par.best <- saved$last.par.best
  env$value.best <- saved$value.best
  ib <- which(names(par) == "beta")
  V <- solve(H)[ib, ib, drop = FALSE]
  V0 <- vcov_all(fit)
  dimnames(V) <- dimnames(V0)
  se <- sqrt(diag(V))
  list(V = V, check = list(
    method = "solve(numDeriv::jacobian(obj$gr, fit$fit$par))[beta, beta]",
    max_rel_se_hessian_fn = max(abs(sqrt(diag(solve(H_fn)[ib, ib, drop = FALSE])) / se - 1)),
    max_rel_se_glmmTMB_vcov = max(abs(sqrt(diag(V0)) / se - 1)),
    max_abs_gradient = max(abs(obj$gr(par)))))
}

emm_entry <- function(fit, specs, by = NULL, type = "link", at = NULL, ...) {
  args <- c(list(fit, specs, by = by), if (!is.null(at)) list(at = at), list(...))
  if (!inherits(fit, "merMod")) {
    args$df <- Inf
    args$vcov. <- precise_vcov(fit)$V
  }
  emm <- do.call(emmeans, args)
  s <- as.data.frame(summary(emm, type = type))
  list(specs = specs, by = by, type = type, at = at, table = s,
       pairs = lapply(c("tukey", "holm", "none"), function(adj) {
         list(adjust = adj, table = as.data.frame(pairs(emm, adjust = adj)))
       }))
}

one <- function(id, call, fit, emms, count = FALSE) {
  cat(id, "\n")
  v <- insight::get_variance(fit, verbose = FALSE)
  r2 <- performance::r2_nakagawa(fit)
  ic <- performance::icc(fit)
  out <- list(
    id = id, call = call, fixef = as.list(fixef_all(fit)), vcov = mat(vcov_all(fit)),
    sigma = sigma(fit), logLik = as.numeric(logLik(fit)),
    variances = lapply(v[c("var.fixed", "var.random", "var.residual", "var.distribution",
                           "var.dispersion")], unname),
    r2 = list(conditional = unname(r2$R2_conditional), marginal = unname(r2$R2_marginal)),
    icc = list(adjusted = ic$ICC_adjusted, conditional = ic$ICC_conditional),
    emmeans = emms)
  if (count) out$null_intercept <- unname(fixef_all(insight::null_model(fit)))
  if (!inherits(fit, "merMod")) {
    pv <- precise_vcov(fit)
    out$precise_vcov <- mat(pv$V)
    out$precise_vcov_check <- pv$check
  }
  out
}

models <- list()

## 1. Gaussian: lmer REML, correlated random slope; emmeans at chosen Days
fit <- lmer(Reaction ~ Days + (Days | Subject), data = sleepstudy, REML = TRUE,
            control = lctrl)
models[[1]] <- one("sleep_reml",
  "lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = TRUE, lctrl)", fit,
  list(emm_entry(fit, "Days", at = list(Days = c(0, 3, 6, 9)), lmer.df = "asymptotic")))

## 2. Binomial (cbind): cbpp
fit <- glmmTMB(cbind(incidence, size - incidence) ~ period + (1 | herd), data = cbpp,
               family = binomial, control = tctrl)
models[[2]] <- one("cbpp_tmb",
  "glmmTMB(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial, tctrl)",
  fit, list(emm_entry(fit, "period"), emm_entry(fit, "period", type = "response")))

## 3. Binomial (binary factor): Contraception, covariate age (and I(age^2)) at its mean
fit <- glmmTMB(use ~ age + I(age^2) + urban + livch + (1 | district), data = Contraception,
               family = binomial, control = tctrl)
models[[3]] <- one("contra_tmb",
  "glmmTMB(use ~ age + I(age^2) + urban + livch + (1 | district), Contraception, binomial, tctrl)",
  fit, list(emm_entry(fit, "livch"), emm_entry(fit, "livch", by = "urban"),
            emm_entry(fit, "urban", type = "response")))

## 4. Poisson: grouseticks
fit <- glmmTMB(TICKS ~ YEAR + cHEIGHT + (1 | BROOD), data = grouseticks, family = poisson,
               control = tctrl)
models[[4]] <- one("grouse_poisson_tmb",
  "glmmTMB(TICKS ~ YEAR + cHEIGHT + (1 | BROOD), grouseticks, poisson, tctrl)",
  fit, list(emm_entry(fit, "YEAR"), emm_entry(fit, "YEAR", type = "response")), count = TRUE)

## 5. Negative binomial (NB2): grouseticks
fit <- glmmTMB(TICKS ~ YEAR + cHEIGHT + (1 | BROOD), data = grouseticks, family = nbinom2,
               control = tctrl)
models[[5]] <- one("grouse_nb2_tmb",
  "glmmTMB(TICKS ~ YEAR + cHEIGHT + (1 | BROOD), grouseticks, nbinom2, tctrl)",
  fit, list(emm_entry(fit, "YEAR")), count = TRUE)

pk <- c("lme4", "glmmTMB", "emmeans", "performance", "insight", "jsonlite", "mlmRev",
        "numDeriv")
meta <- list(R_version = R.version.string,
             packages = as.list(setNames(vapply(pk, function(p) as.character(packageVersion(p)),
                                                ""), pk)),
             df_convention = "asymptotic (df = Inf, z tests) for every model",
             pairs_order = "emmeans' pairs(): level i minus level j for i < j, in level order",
             vcov_convention = paste(
               "emmeans/pairs tables use precise_vcov for glmmTMB models",
               "(solve(numDeriv::jacobian(obj$gr, fit$fit$par))[beta, beta], Richardson",
               "extrapolation) instead of vcov(fit) (sdreport: optimHess, step 1e-3);",
               "vcov(fit) for lmer"))
writeLines(toJSON(list(meta = meta, models = models), auto_unbox = TRUE, digits = NA,
                  pretty = TRUE, null = "null", na = "null"), out_json)
cat("wrote", out_json, "\n")
