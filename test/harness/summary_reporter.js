/**
 * Prints the closing line CI reads: `N passed, N failed`. A test file that
 * fails to load counts as one failure (jest reports no test for it). Skipped
 * tests are neither: they get a line of their own.
 */
class SummaryReporter {
  onRunComplete(_contexts, results) {
    const brokenFiles =
        results.testResults
            .filter(r => r.testExecError != null || (r.failureMessage && r.numFailingTests === 0))
            .length;
    const failed = results.numFailedTests + brokenFiles;
    const skipped = results.numPendingTests + results.numTodoTests;
    if (skipped > 0) {
      console.log(`${skipped} skipped (not counted as passed)`);
    }
    console.log(`${results.numPassedTests} passed, ${failed} failed`);
  }
}
module.exports = SummaryReporter;
