#!/usr/bin/env Rscript
## ---------------------------------------------------------------------------
## make_toolkit_refs.R -- reference values from R's emmeans and performance for
## ngmm_formula's toolkit (emmeans.py, performance.py); issue 18.
##
## Regenerate (from the repository root; about 20 seconds):
##
##   apt-get install -y r-cran-lme4 r-cran-glmmtmb r-cran-mlmrev r-cran-jsonlite \
##                      r-cran-emmeans r-cran-performance
##   Rscript tests/reference/make_toolkit_refs.R
##
## Writes toolkit_refs.json next to this script: "meta" (versions) and "models", one
## entry per model with
##   call, fixef, vcov (rownames/colnames/data), sigma,
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
## V = vcov(fit), for every model.
## Numbers are written with 15 significant digits (jsonlite digits = NA).
## ---------------------------------------------------------------------------

suppressPackageStartupMessages({
  library(lme4)
  library(glmmTMB)
  library(mlmRev)
  library(emmeans)
  library(performance)
  library(insight)
  library(jsonlite)
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

emm_entry <- function(fit, specs, by = NULL, type = "link", at = NULL, ...) {
  args <- c(list(fit, specs, by = by), if (!is.null(at)) list(at = at), list(...))
  if (!inherits(fit, "merMod")) args$df <- Inf
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

pk <- c("lme4", "glmmTMB", "emmeans", "performance", "insight", "jsonlite", "mlmRev")
meta <- list(R_version = R.version.string,
             packages = as.list(setNames(vapply(pk, function(p) as.character(packageVersion(p)),
                                                ""), pk)),
             df_convention = "asymptotic (df = Inf, z tests) for every model",
             pairs_order = "emmeans' pairs(): level i minus level j for i < j, in level order")
writeLines(toJSON(list(meta = meta, models = models), auto_unbox = TRUE, digits = NA,
                  pretty = TRUE, null = "null", na = "null"), out_json)
cat("wrote", out_json, "\n")
