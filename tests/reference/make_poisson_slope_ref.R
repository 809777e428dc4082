# lme4's Laplace fit of poisson_slope.csv (written by poisson_slope.py), for
# tests/test_objective.py::test_poisson_random_slope_after_a_long_line_search_step.
# Run from the repository root: Rscript tests/reference/make_poisson_slope_ref.R
suppressMessages(library(lme4))
d <- read.csv("tests/reference/poisson_slope.csv")
d$g <- factor(d$g)
m <- glmer(y ~ t1 + x3 + (1 + x3 | g), d, family = poisson)  # nAGQ = 1: Laplace
out <- c(
  "{",
  sprintf('  "loglik": %.10f,', as.numeric(logLik(m))),
  sprintf('  "fixef": [%s],', paste(sprintf("%.10f", fixef(m)), collapse = ", ")),
  sprintf('  "theta": [%s],', paste(sprintf("%.10f", getME(m, "theta")), collapse = ", ")),
  sprintf('  "converged": %s,', tolower(as.character(is.null(m@optinfo$conv$lme4$messages)))),
  sprintf('  "R": "%s", "lme4": "%s"', R.version.string, packageVersion("lme4")),
  "}")
writeLines(out, "tests/reference/poisson_slope_ref.json")
