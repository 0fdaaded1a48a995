/** @type {import('jest').Config} */
module.exports = {
  preset : 'ts-jest',
  testEnvironment : 'node',
  roots : ['<rootDir>/test'],
  testMatch : ['**/*.test.ts'],
  // SwiftShader is slow: allow long numerical tests.
  testTimeout : 300000,
  // Two workers on CI's 2 cores: SwiftShader compiles a pipeline on one
  // thread, so a second test file keeps the other core busy.
  maxWorkers : 2,
  globalSetup : '<rootDir>/test/harness/global_setup.ts',
  reporters : ['default', '<rootDir>/test/harness/summary_reporter.js'],
  // kernels/ and the layers import the core by package name (as users do),
  // which must be the same module instance as the tests' `../src`.
  moduleNameMapper : {'^tfjs-flash-attention$' : '<rootDir>/src/index.ts'},
  transform : {
    '^.+\\.ts$' : ['ts-jest', {diagnostics : false}],
  },
};
