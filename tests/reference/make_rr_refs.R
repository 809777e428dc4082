#!/usr/bin/env Rscript
## ---------------------------------------------------------------------------
## make_rr_refs.R -- reference values from glmmTMB for reduced-rank random
## effects rr(...) (factor-analytic / item-response models).
##
## Regenerate (from the repository root; about 1 minute):
##
##   apt-get install -y r-cran-glmmtmb r-cran-jsonlite
##   Rscript tests/reference/make_rr_refs.R
##
## Writes rr_refs.json next to this script. CI never runs R: the script and
## its output are both committed. See README.md ("rr_refs.json") for the
## layout.
##
## Data: the CSV files bundled with the Python package (datasets/VerbAgg.csv,
## datasets/lsat7.csv), with every column rebuilt from datasets/columns.csv
## and datasets/levels.csv exactly as ngmm_formula.datasets.load() does
## (factor levels in R's order: the item order fixes which loadings are
## structurally zero).
##
## Numbers are written with the shortest of 15 or 17 significant digits that
## reads back to the identical double (jsonlite stops at 15), so every value
## is R's double exactly.
## ---------------------------------------------------------------------------

suppressPackageStartupMessages({
  library(glmmTMB)
  library(jsonlite)
})

script_dir <- local({
  a <- commandArgs(trailingOnly = FALSE)
  f <- sub("^--file=", "", a[grep("^--file=", a)])
  if (length(f)) dirname(normalizePath(f)) else file.path(getwd(), "tests", "reference")
})
repo_root <- normalizePath(file.path(script_dir, "..", ".."))
data_dir <- file.path(repo_root, "datasets")
out_json <- file.path(script_dir, "rr_refs.json")

## ---------------------------------------------------------------------------
## Bundled data, rebuilt as ngmm_formula.datasets.load() does
## ---------------------------------------------------------------------------
columns_csv <- read.csv(file.path(data_dir, "columns.csv"), stringsAsFactors = FALSE)
levels_csv <- read.csv(file.path(data_dir, "levels.csv"), stringsAsFactors = FALSE,
                       colClasses = c(level = "character"))

read_bundled <- function(name) {
  cols <- columns_csv[columns_csv$dataset == name, ]
  cols <- cols[order(cols$position), ]
  cls <- ifelse(cols$type %in% c("factor", "ordered"), "character",
                ifelse(cols$type == "integer", "integer", "numeric"))
  d <- read.csv(file.path(data_dir, paste0(name, ".csv")), colClasses = setNames(cls, cols$column),
                stringsAsFactors = FALSE, na.strings = character(0))
  stopifnot(identical(names(d), cols$column))
  for (k in seq_len(nrow(cols))) {
    if (cols$type[k] %in% c("factor", "ordered")) {
      lv <- levels_csv[levels_csv$dataset == name & levels_csv$column == cols$column[k], ]
      lv <- lv$level[order(lv$level_position)]
      d[[cols$column[k]]] <- factor(d[[cols$column[k]]], levels = lv,
                                    ordered = cols$type[k] == "ordered")
      stopifnot(!anyNA(d[[cols$column[k]]]))
    }
  }
  d
}

VerbAgg <- read_bundled("VerbAgg")
VerbAgg$r <- as.integer(VerbAgg$r2 == "Y")
stopifnot(nrow(VerbAgg) == 7584, nlevels(VerbAgg$item) == 24, nlevels(VerbAgg$id) == 316,
          sum(VerbAgg$r) == 3611)
lsat7 <- read_bundled("lsat7")
stopifnot(nrow(lsat7) == 5000, identical(levels(lsat7$item), paste0("Q", 1:5)),
          nlevels(lsat7$id) == 1000,
          identical(as.vector(tapply(lsat7$y, lsat7$item, sum)), c(828L, 658L, 772L, 606L, 843L)))
data_list <- list(VerbAgg = VerbAgg, lsat7 = lsat7)

## ---------------------------------------------------------------------------
## JSON writer with full double precision
## ---------------------------------------------------------------------------
## Conventions: a named vector is an object {name: value}; an unnamed vector of
## length 1 is a scalar, AsIs (I(x)) forces an array; a matrix is
## {"rownames", "colnames", "data"} with data a list of rows; NA/NaN/Inf -> null.
fmt_num <- function(x) {
  out <- character(length(x))
  bad <- !is.finite(x)
  out[bad] <- "null"
  if (is.integer(x)) {
    out[!bad] <- as.character(x[!bad])
  } else if (any(!bad)) {
    v <- x[!bad]
    s <- formatC(v, digits = 15, format = "g")
    redo <- as.numeric(s) != v
    s[redo] <- formatC(v[redo], digits = 17, format = "g")
    out[!bad] <- trimws(s)
  }
  out
}
fmt_str <- function(x) vapply(x, function(s) {
  if (is.na(s)) "null" else as.character(toJSON(unbox(s)))
}, character(1), USE.NAMES = FALSE)
fmt_atoms <- function(x) {
  if (is.numeric(x)) fmt_num(x)
  else if (is.logical(x)) ifelse(is.na(x), "null", ifelse(x, "true", "false"))
  else if (is.character(x)) fmt_str(x)
  else if (is.factor(x)) fmt_str(as.character(x))
  else stop("cannot serialise ", class(x)[1])
}
to_json <- function(x, indent = 0) {
  pad <- strrep("  ", indent + 1)
  end <- strrep("  ", indent)
  obj <- function(keys, vals) {
    if (!length(keys)) return("{}")
    paste0("{\n", paste0(pad, fmt_str(keys), ": ", vals, collapse = ",\n"), "\n", end, "}")
  }
  if (is.null(x)) return("null")
  if (is.matrix(x)) {
    rows <- lapply(seq_len(nrow(x)), function(i) I(x[i, , drop = TRUE]))
    return(to_json(list(rownames = if (is.null(rownames(x))) NULL else I(rownames(x)),
                        colnames = if (is.null(colnames(x))) NULL else I(colnames(x)),
                        data = rows), indent))
  }
  if (is.list(x)) {
    vals <- vapply(x, to_json, character(1), indent = indent + 1, USE.NAMES = FALSE)
    if (!is.null(names(x))) return(obj(names(x), vals))
    if (!length(x)) return("[]")
    return(paste0("[\n", paste0(pad, vals, collapse = ",\n"), "\n", end, "]"))
  }
  atoms <- fmt_atoms(unclass(x))
  if (!is.null(names(x)) && !inherits(x, "AsIs")) return(obj(names(x), atoms))
  if (length(x) == 1 && !inherits(x, "AsIs")) return(atoms)
  paste0("[", paste(atoms, collapse = ", "), "]")
}
mat <- function(m, rn = rownames(m), cn = colnames(m)) {
  m <- as.matrix(m)
  dimnames(m) <- list(rn, cn)
  m
}

## ---------------------------------------------------------------------------
## glmmTMB's rr parameterisation (checked against the reported fact_load below)
## ---------------------------------------------------------------------------
## For an rr term of p columns and rank d, theta has p*d - d*(d-1)/2 entries:
##   theta[1:d]    the diagonal Lambda[j, j], j = 1..d (no exp/log transform),
##   theta[-(1:d)] the strictly-lower entries, column by column
##                 (Lambda[2:p, 1], then Lambda[3:p, 2], ...);
## entries above the diagonal are 0. Cov(b_group) = Lambda Lambda' exactly.
rr_rank <- function(p, nt) round((2 * p + 1 - sqrt((2 * p + 1)^2 - 8 * nt)) / 2)
rr_lambda <- function(theta, p, d) {
  stopifnot(length(theta) == p * d - d * (d - 1) / 2)
  L <- matrix(0, p, d)
  for (j in seq_len(d)) L[j, j] <- theta[j]
  k <- d
  for (j in seq_len(d)) if (j < p) for (i in (j + 1):p) {
    k <- k + 1
    L[i, j] <- theta[k]
  }
  L
}
## positions in theta of each Lambda entry (NA above the diagonal), 1-based
rr_theta_index <- function(p, d) {
  nt <- p * d - d * (d - 1) / 2
  idx <- rr_lambda(seq_len(nt), p, d)
  idx[upper.tri(idx)] <- NA
  idx
}

## ---------------------------------------------------------------------------
## Models
## ---------------------------------------------------------------------------
models <- list(
  list(id = "vb_rasch", dataset = "VerbAgg", formula = "r ~ 0 + item + (1 | id)"),
  list(id = "vb_rr1", dataset = "VerbAgg", formula = "r ~ 0 + item + rr(0 + item | id, d = 1)"),
  list(id = "vb_rr2", dataset = "VerbAgg", formula = "r ~ 0 + item + rr(0 + item | id, d = 2)"),
  list(id = "vb_rr1_cov", dataset = "VerbAgg",
       formula = "r ~ 0 + item + Anger + Gender + rr(0 + item | id, d = 1)"),
  list(id = "lsat_rr1", dataset = "lsat7", formula = "y ~ 0 + item + rr(0 + item | id, d = 1)"),
  list(id = "lsat_rasch", dataset = "lsat7", formula = "y ~ 0 + item + (1 | id)")
)
default_ctrl_txt <- "glmmTMBControl()"
retry_ctrl_txt <- "glmmTMBControl(optCtrl = list(iter.max = 1e4, eval.max = 1e4))"

fit_model <- function(formula, data, ctrl) {
  warns <- character(0)
  t0 <- proc.time()[["elapsed"]]
  fit <- withCallingHandlers(
    glmmTMB(formula, data = data, family = binomial, control = ctrl),
    warning = function(w) {
      warns <<- c(warns, conditionMessage(w))
      invokeRestart("muffleWarning")
    })
  list(fit = fit, time = proc.time()[["elapsed"]] - t0, warnings = warns)
}

convergence_info <- function(res) {
  fit <- res$fit
  list(code = fit$fit$convergence, message = fit$fit$message,
       iterations = fit$fit$iterations, evaluations = as.list(fit$fit$evaluations),
       pdHess = fit$sdr$pdHess,
       max_abs_gradient = max(abs(fit$obj$gr(fit$fit$par))),
       warnings = I(res$warnings))
}
clean <- function(conv) conv$code == 0 && isTRUE(conv$pdHess) && !length(conv$warnings)

fits_out <- list()
for (m in models) {
  cat(sprintf("%-11s %s\n", m$id, m$formula))
  dat <- data_list[[m$dataset]]
  fml <- as.formula(m$formula, env = globalenv())
  res <- fit_model(fml, dat, glmmTMBControl())
  conv <- convergence_info(res)
  ctrl_used <- default_ctrl_txt
  first_attempt <- NULL
  if (!clean(conv)) {
    cat("  not clean with the default control; refitting with", retry_ctrl_txt, "\n")
    first_attempt <- list(control = default_ctrl_txt, logLik = as.numeric(logLik(res$fit)),
                          convergence = conv)
    ctrl <- glmmTMBControl(optCtrl = list(iter.max = 1e4, eval.max = 1e4))
    res <- fit_model(fml, dat, ctrl)
    conv <- convergence_info(res)
    ctrl_used <- retry_ctrl_txt
  } else {
    ctrl <- glmmTMBControl()
  }
  ## timing: median of 3 runs when the first took < 5 s
  times <- res$time
  if (res$time < 5) times <- c(times, replicate(2, fit_model(fml, dat, ctrl)$time))
  fit <- res$fit

  ll <- logLik(fit)
  pars <- fit$fit$par
  beta_idx <- which(names(pars) == "beta")
  theta_idx <- which(names(pars) == "theta")
  fe <- fixef(fit)$cond
  stopifnot(length(beta_idx) == length(fe), all(pars[beta_idx] == fe))
  se_all <- sqrt(diag(fit$sdr$cov.fixed))
  stopifnot(identical(names(se_all), names(pars)))

  restruc <- fit$modelInfo$reStruc$condReStruc
  stopifnot(length(restruc) == 1)
  term <- restruc[[1]]
  cn <- fit$modelInfo$reTrms$cond$cnms$id
  p <- term$blockSize
  is_rr <- term$blockCode == glmmTMB:::.valid_covstruct[["rr"]]
  theta <- unname(pars[theta_idx])
  theta_se <- unname(se_all[theta_idx])
  rep <- fit$obj$env$report(fit$fit$parfull)

  out <- list(
    id = m$id, dataset = m$dataset, formula = m$formula, family = "binomial", link = "logit",
    call = sprintf("glmmTMB(%s, data = %s, family = binomial, control = %s)",
                   m$formula, m$dataset, ctrl_used),
    control = ctrl_used,
    nobs = nobs(fit), n_groups = nlevels(dat$id),
    logLik = as.numeric(ll), df = attr(ll, "df"), AIC = AIC(fit), BIC = BIC(fit),
    convergence = conv,
    first_attempt = first_attempt,
    fixef = fe, fixef_se = setNames(unname(se_all[beta_idx]), names(fe)),
    re_term = names(restruc)[1], re_columns = I(cn),
    theta = I(theta), theta_se = I(theta_se)
  )

  re <- ranef(fit, condVar = TRUE)$cond$id
  cv <- attr(re, "condVar")
  first10 <- rownames(re)[1:10]
  stopifnot(identical(first10, levels(dat$id)[1:10]))

  if (is_rr) {
    d <- rr_rank(p, term$blockNumTheta)
    L <- rr_lambda(theta, p, d)
    L_rep <- rep$fact_load[[1]]
    stopifnot(max(abs(L - L_rep)) == 0)
    cov <- L %*% t(L)
    vc <- VarCorr(fit)$cond$id
    cov_check <- max(abs(unclass(vc)[seq_len(p), seq_len(p)] - cov))
    sd_check <- max(abs(rep$sd[[1]] - sqrt(rowSums(L^2))))
    stopifnot(cov_check < 1e-10, sd_check < 1e-12)
    L_se <- rr_lambda(theta_se, p, d)
    L_se[upper.tri(L_se)] <- NA
    s <- sign(diag(L)[seq_len(d)])
    L_pos <- L %*% diag(s, d)
    lat_names <- paste0("factor", seq_len(d))
    ## ranef() of an rr term: each group carries p slots labelled with the
    ## item names; the first d hold the latent factor scores u (the conditional
    ## modes), the other p - d are unused (mode 0). The item-level random
    ## effects are Lambda u.
    re_m <- as.matrix(re)
    u <- re_m[, seq_len(d), drop = FALSE]
    unused_max <- if (d < p) max(abs(re_m[, (d + 1):p])) else 0
    unused_condvar <- if (d < p) range(apply(cv[(d + 1):p, (d + 1):p, , drop = FALSE], 3,
                                             function(a) diag(as.matrix(a)))) else NULL
    u_sd <- t(apply(cv[seq_len(d), seq_len(d), , drop = FALSE], 3,
                    function(a) sqrt(diag(as.matrix(a)))))
    if (d == 1) u_sd <- t(u_sd)
    item_eff <- u %*% t(L)
    out$rr <- list(
      d = d, p = p, n_theta = length(theta),
      theta_index = mat(rr_theta_index(p, d), cn, lat_names),
      loadings = mat(L, cn, lat_names),
      loadings_se = mat(L_se, cn, lat_names),
      glmmTMB_diag = I(diag(L)[seq_len(d)]),
      glmmTMB_diag_positive = all(diag(L)[seq_len(d)] > 0),
      column_signs = I(s),
      loadings_positive_diag = mat(L_pos, cn, lat_names),
      covariance = mat(cov, cn, cn),
      checks = list(max_abs_loadings_minus_report_fact_load = max(abs(L - L_rep)),
                    max_abs_covariance_minus_VarCorr = cov_check,
                    max_abs_report_sd_minus_rowsums = sd_check)
    )
    out$ranef <- list(
      ids = I(first10),
      latent_modes = mat(u[1:10, , drop = FALSE], first10, lat_names),
      latent_condsd = mat(u_sd[1:10, , drop = FALSE], first10, lat_names),
      latent_modes_positive_diag = mat(u[1:10, , drop = FALSE] %*% diag(s, d), first10,
                                       lat_names),
      item_effects = mat(item_eff[1:10, , drop = FALSE], first10, cn),
      ## every group (lsat7's first ids all share one response pattern)
      all_latent_modes = mat(u, rownames(re), lat_names),
      all_latent_condsd = mat(u_sd, rownames(re), lat_names),
      unused_slots_max_abs_mode = unused_max,
      unused_slots_condvar_range = if (is.null(unused_condvar)) NULL else I(unused_condvar)
    )
  } else {
    sd_re <- exp(theta)
    out$random_intercept <- list(theta_meaning = "log SD of the random intercept",
                                 sd = sd_re, variance = sd_re^2,
                                 sd_report = rep$sd[[1]])
    out$ranef <- list(ids = I(first10),
                      condval = I(re[1:10, 1]),
                      condsd = I(sqrt(cv[1, 1, 1:10])),
                      all_ids = I(rownames(re)),
                      all_condval = I(re[, 1]),
                      all_condsd = I(sqrt(cv[1, 1, ])))
  }

  ## objective at fixed parameters (after ranef, so last.par.best is untouched)
  par_opt <- pars
  par_pert <- pars
  par_pert[beta_idx] <- par_pert[beta_idx] + 0.1
  par_pert[theta_idx] <- par_pert[theta_idx] * 1.1
  point <- function(par) {
    v <- fit$obj$fn(par)
    g <- fit$obj$gr(par)
    pt <- list(par = I(unname(par)),
               fixef = setNames(unname(par[beta_idx]), names(fe)),
               theta = I(unname(par[theta_idx])),
               value = v, max_abs_gradient = max(abs(g)))
    if (is_rr) pt$loadings <- mat(rr_lambda(unname(par[theta_idx]), p, out$rr$d), cn,
                                  colnames(out$rr$loadings))
    else pt$sd <- exp(unname(par[theta_idx]))
    pt
  }
  opt_pt <- point(par_opt)
  pert_pt <- point(par_pert)
  pert_again <- fit$obj$fn(par_pert)
  opt_again <- fit$obj$fn(par_opt)
  out$objective <- list(
    meaning = "fit$obj$fn(par): minus the Laplace log-likelihood (binary data: no constants to drop)",
    par_names = I(names(pars)),
    perturbation = if (is_rr) "fixed effects + 0.1, theta * 1.1 (so the loadings * 1.1)"
                   else "fixed effects + 0.1, theta (the log SD) * 1.1",
    optimum = opt_pt, perturbed = pert_pt,
    optimum_plus_logLik = opt_pt$value + as.numeric(ll),
    repeat_abs_diff = max(abs(pert_again - pert_pt$value), abs(opt_again - opt_pt$value))
  )
  ## polished optimum: nlminb restarted from glmmTMB's optimum with a tight
  ## tolerance (how far glmmTMB's default stopping point is from the optimum)
  pol <- nlminb(par_opt, fit$obj$fn, fit$obj$gr,
                control = list(rel.tol = 1e-14, iter.max = 1e4, eval.max = 1e4))
  pol_pt <- point(pol$par)
  pol_pt$nlminb_message <- pol$message
  pol_pt$logLik <- -pol$objective
  pol_pt$logLik_minus_glmmTMB_logLik <- -pol$objective - as.numeric(ll)
  pol_pt$max_abs_par_change <- max(abs(pol$par - par_opt))
  out$polished <- pol_pt
  fit$obj$fn(par_opt)
  out$time_sec <- round(median(times), 3)
  out$time_runs <- I(round(times, 3))
  fits_out[[m$id]] <- out
  cat(sprintf("  logLik %.10f  df %d  conv %d (%s)  pdHess %s  %.2f s\n", as.numeric(ll),
              attr(ll, "df"), conv$code, conv$message, conv$pdHess, median(times)))
}

## ---------------------------------------------------------------------------
## Probes of the parameterisation and of how d is parsed
## ---------------------------------------------------------------------------
## theta = 1, 2, ..., n_theta plugged into the lsat7 rank-2 structure: the
## reported fact_load shows where each theta entry goes.
probe_fit <- glmmTMB(y ~ 0 + item + rr(0 + item | id, d = 2), data = lsat7,
                     family = binomial, doFit = FALSE)
probe_obj <- with(probe_fit, TMB::MakeADFun(data = data.tmb, parameters = parameters,
                                            random = "b", DLL = "glmmTMB", silent = TRUE,
                                            map = mapArg))
pl <- probe_obj$env$par
pl[names(pl) == "theta"] <- seq_len(sum(names(pl) == "theta"))
probe_L <- probe_obj$report(pl)$fact_load[[1]]
stopifnot(identical(probe_L, rr_lambda(seq_len(9), 5, 2)))
probe_sd <- probe_obj$report(pl)$sd[[1]]
stopifnot(max(abs(probe_sd - sqrt(rowSums(probe_L^2)))) < 1e-12)

n_theta_for <- function(rhs) {
  s <- glmmTMB(as.formula(paste("r ~ 0 + item +", rhs)), data = VerbAgg, family = binomial,
               doFit = FALSE)
  c(n_theta = s$condReStruc[[1]]$blockNumTheta,
    start_theta = unique(s$parameters$theta))
}
d_probes <- list()
for (rhs in c("rr(0 + item | id)", "rr(0 + item | id, 1)", "rr(0 + item | id, d = 1)",
              "rr(0 + item | id, d = 2)", "rr(0 + item | id, 3)")) {
  v <- n_theta_for(rhs)
  d_probes[[rhs]] <- list(n_theta = unname(v["n_theta"]), d = unname(rr_rank(24, v["n_theta"])),
                          start_theta = unname(v["start_theta"]))
}

meta <- list(
  generated_by = "tests/reference/make_rr_refs.R",
  command = "Rscript tests/reference/make_rr_refs.R",
  date = as.character(Sys.Date()),
  R_version = R.version.string,
  platform = R.version$platform,
  packages = list(glmmTMB = as.character(packageVersion("glmmTMB")),
                  TMB = as.character(packageVersion("TMB")),
                  Matrix = as.character(packageVersion("Matrix")),
                  jsonlite = as.character(packageVersion("jsonlite"))),
  data = list(
    VerbAgg = "datasets/VerbAgg.csv (lme4::VerbAgg), factors rebuilt from datasets/levels.csv; r = as.integer(r2 == \"Y\")",
    lsat7 = "datasets/lsat7.csv (psych::lsat7 in long format), factors rebuilt from datasets/levels.csv"),
  family = "binomial(logit), glmmTMB default Laplace approximation",
  controls = list(default = default_ctrl_txt, retry_if_not_clean = retry_ctrl_txt,
                  note = "every model is fitted with the default control; a model that does not converge cleanly (nlminb code != 0, pdHess FALSE or any warning) is refitted with the retry control and its first attempt kept in first_attempt. In the committed output no model needed the retry."),
  numbers = "doubles written with the shortest of 15 or 17 significant digits that round-trips; NA -> null",
  rr_parameterisation = list(
    theta_length = "p*d - d*(d-1)/2 for p columns (items) and rank d",
    fill = "theta[1:d] are the diagonal Lambda[j, j] (j = 1..d), untransformed (no log/exp); theta[(d+1):n_theta] are the strictly-lower entries column by column: Lambda[2:p, 1], then Lambda[3:p, 2], ...; entries above the diagonal are 0. theta_index in each fit gives the 1-based theta position of every Lambda entry",
    covariance = "Cov(b_group) = Lambda Lambda' exactly (VarCorr and report()$sd agree): no extra diagonal variance; for d = 1 all correlations are +-1",
    random_effects = "b holds p slots per group; the first d are the latent factor scores u ~ N(0, I_d) and the item-level effects are Lambda u. The other p - d slots enter the joint likelihood only through their own N(0, 1) density and no data, so the Laplace approximation integrates them out exactly (mode 0, conditional variance 1) and they do not change the log-likelihood. ranef() returns the p slots with the item names as column labels: its first d columns are u, not item effects.",
    start = "glmmTMB starts every rr theta entry at 1 (not 0), fixed effects at 0",
    sign = "each column of Lambda (with the matching latent score) is identified only up to sign; loadings_positive_diag multiplies column j by sign(Lambda[j, j]); glmmTMB_diag_positive says whether glmmTMB's own diagonal was already positive",
    probe_theta = I(seq_len(9)),
    probe_fact_load_lsat7_d2 = mat(probe_L, paste0("Q", 1:5), c("factor1", "factor2")),
    d_parsing = "getXReTrms: for an rr() term the first argument after the bar term is evaluated in the formula's environment and used as d whatever its name (rr(x | g, 1) == rr(x | g, d = 1)); with no argument d defaults to 2",
    d_probes = d_probes)
)

writeLines(to_json(list(meta = meta, fits = fits_out)), out_json)
cat("wrote", out_json, "\n")
