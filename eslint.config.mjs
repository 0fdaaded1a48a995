// ESLint with typescript-eslint's recommended rules, for every TypeScript
// and JavaScript file of the repository. Formatting is clang-format's
// (scripts/format.mjs); `npm run lint` runs both.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
    {
      ignores: [
        'node_modules/',
        'dist/',
        'coverage/',
        'build/',
        'benchmarks/out/',
        'demo/out/',
        'test-results/',
        '.device*/',
      ],
    },
    js.configs.recommended,
    ...tseslint.configs.recommended,
    {
      languageOptions: {
        ecmaVersion: 2022,
        sourceType: 'module',
        globals: {
          console: 'readonly',
          process: 'readonly',
          require: 'readonly',
          module: 'writable',
          __dirname: 'readonly',
          globalThis: 'readonly',
          navigator: 'readonly',
          document: 'readonly',
          window: 'readonly',
          performance: 'readonly',
          setTimeout: 'readonly',
          clearTimeout: 'readonly',
          Buffer: 'readonly',
          URL: 'readonly',
          fetch: 'readonly',
        },
      },
      rules: {
        // Lines of code within 100 columns; long strings and template
        // literals (WGSL, messages) may run past.
        'max-len': [
          'error', {
            code: 100,
            ignoreStrings: true,
            ignoreTemplateLiterals: true,
            ignoreUrls: true,
            ignoreRegExpLiterals: true,
          }
        ],
        '@typescript-eslint/no-unused-vars':
            ['error', {argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrors: 'none'}],
        // `let [a, b] = ...` where only one is reassigned stays one statement.
        'prefer-const': ['error', {destructuring: 'all'}],
      },
    },
    {
      // CommonJS files, and tests, benchmarks and scripts that load native
      // modules or the built package at run time.
      files: ['**/*.cjs', '**/*.js', 'test/**', 'benchmarks/**', 'scripts/**'],
      rules: {'@typescript-eslint/no-require-imports': 'off'},
    },
    {
      // Tests reach into tfjs and browser internals that have no types.
      files: ['test/**'],
      rules: {'@typescript-eslint/no-explicit-any': 'off'},
    },
);
