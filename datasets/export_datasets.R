# Export the data sets bundled with ngmm_formula from R's own packages.
#
# Run once from the repository root (needs lme4, mlmRev and psych, e.g. Debian's r-cran-lme4,
# r-cran-mlmrev and r-cran-psych):
#
#     Rscript datasets/export_datasets.R
#
# and commit the script together with what it writes next to itself:
#
#   <name>.csv / InstEval.csv.gz  one file per data frame, R's row order, no row names; factor
#                                 columns as their labels, doubles with enough digits to
#                                 round-trip exactly (15 significant digits, 17 where needed)
#   columns.csv                   dataset, column, position, type (R's column classes:
#                                 "double", "integer", "factor", "ordered")
#   levels.csv                    dataset, column, level_position (1-based, R's order), level,
#                                 ordered (TRUE/FALSE) for every factor column
#
# A CSV file cannot carry the factor metadata (level order, orderedness) nor the distinction
# between a double and an integer column, hence columns.csv and levels.csv;
# ngmm_formula.datasets.load() uses both to rebuild the data frame as R has it.

suppressPackageStartupMessages({
  library(lme4)
  library(mlmRev)
  library(psych)
})

file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
out_dir <- if (length(file_arg)) dirname(sub("^--file=", "", file_arg[1])) else "datasets"

# psych::lsat7 is an integer matrix, 1000 persons (rows, no row names) x 5 binary items
# (columns Q1..Q5). It is bundled in long format, stacked item by item like lme4::VerbAgg
# (all 1000 persons for Q1, then Q2, ...): id (factor, levels "1".."1000" = the matrix row),
# item (factor, levels = the column names in their order), y (integer 0/1).
lsat7_long <- function(m = psych::lsat7) {
  stopifnot(is.matrix(m), all(m %in% c(0L, 1L)))
  data.frame(id = factor(rep(seq_len(nrow(m)), ncol(m)), levels = seq_len(nrow(m))),
             item = factor(rep(colnames(m), each = nrow(m)), levels = colnames(m)),
             y = as.integer(as.vector(m)))
}

sets <- list(
  cbpp = lme4::cbpp,
  sleepstudy = lme4::sleepstudy,
  grouseticks = lme4::grouseticks,
  VerbAgg = lme4::VerbAgg,
  Penicillin = lme4::Penicillin,
  Pastes = lme4::Pastes,
  Dyestuff = lme4::Dyestuff,
  InstEval = lme4::InstEval,
  Contraception = mlmRev::Contraception,
  Exam = mlmRev::Exam,
  # Chem97$student is the row number (levels "1".."31022", one row each): left out, so that
  # levels.csv does not grow by 31022 rows that say nothing.
  Chem97 = mlmRev::Chem97[, setdiff(names(mlmRev::Chem97), "student")],
  guImmun = mlmRev::guImmun,
  lsat7 = lsat7_long()
)
compressed <- c("InstEval", "Chem97")

# Shortest of 15 or 17 significant digits that reads back to the identical double.
format_double <- function(x) {
  s <- formatC(x, digits = 15, format = "g")
  bad <- as.numeric(s) != x
  s[bad] <- formatC(x[bad], digits = 17, format = "g")
  trimws(s)
}

column_type <- function(x) {
  if (is.ordered(x)) "ordered"
  else if (is.factor(x)) "factor"
  else if (is.integer(x)) "integer"
  else if (is.double(x)) "double"
  else stop("unsupported column class: ", class(x)[1])
}

columns <- list()
levels_long <- list()
for (name in names(sets)) {
  d <- sets[[name]]
  stopifnot(!anyNA(d))
  types <- vapply(d, column_type, character(1))
  columns[[name]] <- data.frame(dataset = name, column = names(d),
                                position = seq_along(d), type = types)
  out <- d
  for (j in seq_along(d)) {
    x <- d[[j]]
    if (is.factor(x)) {
      out[[j]] <- as.character(x)
      levels_long[[paste(name, names(d)[j])]] <- data.frame(
        dataset = name, column = names(d)[j], level_position = seq_along(levels(x)),
        level = levels(x), ordered = is.ordered(x))
    } else if (is.double(x)) {
      out[[j]] <- format_double(x)
    }
  }
  factor_cols <- which(types %in% c("factor", "ordered"))
  path <- file.path(out_dir, paste0(name, if (name %in% compressed) ".csv.gz" else ".csv"))
  con <- if (name %in% compressed) gzfile(path, "w") else file(path, "w")
  write.table(out, con, sep = ",", quote = factor_cols, row.names = FALSE, eol = "\n",
              qmethod = "double")
  close(con)
  cat(sprintf("%-14s %6d x %d  -> %s\n", name, nrow(d), ncol(d), path))
}

write.csv(do.call(rbind, columns), file.path(out_dir, "columns.csv"), row.names = FALSE,
          eol = "\n")
write.csv(do.call(rbind, levels_long), file.path(out_dir, "levels.csv"), row.names = FALSE,
          eol = "\n")
cat(R.version.string, "; lme4", as.character(packageVersion("lme4")),
    "; mlmRev", as.character(packageVersion("mlmRev")),
    "; psych", as.character(packageVersion("psych")), "\n")
