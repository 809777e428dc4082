# lme4's fit of benchmarks/crossed_lmm.py's data (a CSV path as the argument); prints JSON.
suppressMessages(library(lme4))
d <- read.csv(commandArgs(TRUE)[1])
d$user <- factor(d$user)
d$item <- factor(d$item)
t <- system.time(m <- lmer(y ~ 1 + (1 | user) + (1 | item), d, REML = FALSE))
cat(sprintf('{"seconds": %.3f, "loglik": %.6f}\n', t[["elapsed"]], as.numeric(logLik(m))))
