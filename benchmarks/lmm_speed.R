# lme4's side of benchmarks/lmm_speed.py: fits each linear mixed model of the benchmark with
# lmer's default control (what a user gets) and prints one JSON object per model: logLik,
# the random-effect standard deviations (as.data.frame(VarCorr(fit))$sdcor, variances only),
# sigma, the optimiser's function evaluations and the elapsed time (median of `reps`, after
# one untimed warm-up fit; R's start-up and package loading are not timed).
#
#   Rscript benchmarks/lmm_speed.R [reps] > benchmarks/results/lmm_speed_lme4.json
#
# Needs lme4, mlmRev and nlme (Debian: r-cran-lme4 r-cran-mlmrev r-cran-nlme).
suppressMessages({library(lme4); library(mlmRev); library(nlme)})
args <- commandArgs(trailingOnly = TRUE)
reps <- if (length(args)) as.integer(args[1]) else 3L

data(star, package = "mlmRev")
star <- droplevels(star[complete.cases(star[, c("math", "gr", "sx", "eth", "cltype")]), ])
# gr (grade) is an ordered factor in mlmRev, which lmer codes by polynomial contrasts; the
# CSV copy the Python side reads has plain labels, coded by treatment contrasts. The fits are
# the same model, but REML's log|X'V^{-1}X| depends on the coding of X (0.69 here), so
# lme4 gets the unordered factor too.
star$gr <- factor(star$gr, ordered = FALSE)
data(ScotsSec, package = "mlmRev")
data(Chem97, package = "mlmRev")
data(InstEval, package = "lme4")
data(Orthodont, package = "nlme")
Orthodont <- as.data.frame(Orthodont)
Orthodont$Subject <- factor(as.character(Orthodont$Subject))
data(Machines, package = "nlme")
Machines <- as.data.frame(Machines)
Machines$Worker <- factor(as.character(Machines$Worker))
Machines$Machine <- factor(as.character(Machines$Machine))

models <- list(
  list(id = "star", data = "star", REML = TRUE,
       formula = math ~ gr + sx + eth + cltype + (1 | id) + (1 | tch) + (1 | sch)),
  list(id = "scotssec", data = "ScotsSec", REML = FALSE,
       formula = attain ~ verbal + sex + (1 | primary) + (1 | second)),
  list(id = "chem97", data = "Chem97", REML = FALSE,
       formula = score ~ gcsecnt + (1 | school) + (1 | lea)),
  list(id = "insteval", data = "InstEval", REML = TRUE,
       formula = y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept:service)),
  list(id = "orthodont", data = "Orthodont", REML = TRUE,
       formula = distance ~ age + (age || Subject)),
  list(id = "machines", data = "Machines", REML = TRUE,
       formula = score ~ Machine + (1 | Worker) + (1 | Worker:Machine))
)

json_num <- function(x) trimws(formatC(x, digits = 15, format = "g"))
only <- Sys.getenv("LMM_SPEED_ONLY")
for (m in models) {
  if (nzchar(only) && !(m$id %in% strsplit(only, ",")[[1]])) next
  d <- get(m$data)
  fit <- lmer(m$formula, d, REML = m$REML)  # warm-up
  times <- numeric(0)
  for (r in seq_len(if (m$id == "insteval") max(1L, reps - 2L) else reps)) {
    times <- c(times, system.time(fit <- lmer(m$formula, d, REML = m$REML))[["elapsed"]])
  }
  vc <- as.data.frame(VarCorr(fit))
  vc <- vc[is.na(vc$var2), ]
  sds <- paste0('"', paste(vc$grp, ifelse(is.na(vc$var1), "", vc$var1), sep = ":"), '": ',
                json_num(vc$sdcor), collapse = ", ")
  cat(sprintf(paste0('{"id": "%s", "nobs": %d, "logLik": %s, "sd": {%s}, "feval": %d, ',
                     '"time": %s, "times": [%s]}\n'),
              m$id, nobs(fit), json_num(as.numeric(logLik(fit))), sds,
              as.integer(fit@optinfo$feval), json_num(median(times)),
              paste(json_num(times), collapse = ", ")))
}
